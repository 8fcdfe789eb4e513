-- Every committed change to a user or to one of their subscriptions announces the user's id on
-- the channel `account_changed` (LISTEN/NOTIFY delivers it at commit, and not at all on rollback).
-- API processes keep accounts (profile and tier facts) in memory only while they listen, and drop
-- an account when its id arrives, whoever made the change: the service, a migration, or SQL by hand.
CREATE FUNCTION notify_account_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN
    PERFORM pg_notify('account_changed', to_jsonb(OLD) ->> TG_ARGV[0]);
  END IF;
  IF TG_OP <> 'DELETE' THEN
    PERFORM pg_notify('account_changed', to_jsonb(NEW) ->> TG_ARGV[0]);
  END IF;
  RETURN NULL;
END
$$;
--> statement-breakpoint
CREATE TRIGGER users_account_changed AFTER INSERT OR UPDATE OR DELETE ON users
  FOR EACH ROW EXECUTE FUNCTION notify_account_changed('id');
--> statement-breakpoint
CREATE TRIGGER subscriptions_account_changed AFTER INSERT OR UPDATE OR DELETE ON subscriptions
  FOR EACH ROW EXECUTE FUNCTION notify_account_changed('user_id');
--> statement-breakpoint
-- A TRUNCATE has no rows to name: it announces `*`, every account.
CREATE FUNCTION notify_all_accounts_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('account_changed', '*');
  RETURN NULL;
END
$$;
--> statement-breakpoint
CREATE TRIGGER users_truncated AFTER TRUNCATE ON users
  FOR EACH STATEMENT EXECUTE FUNCTION notify_all_accounts_changed();
--> statement-breakpoint
CREATE TRIGGER subscriptions_truncated AFTER TRUNCATE ON subscriptions
  FOR EACH STATEMENT EXECUTE FUNCTION notify_all_accounts_changed();
