// EXPLAIN (ANALYZE, BUFFERS) of the hot queries, as the service sends them, against the bench
// database after the scenarios (so the tables hold what the runs wrote). Writes run inside a
// transaction that is rolled back.
import type pg from 'pg';

interface Sample {
  userId: string;
  roomId: string;
  sessionId: string | undefined;
  replyId: string;
  promptId: string;
  promptAt: Date;
}

/** The statements of the request and reply paths (same SQL as drizzle builds for them). */
function hotQueries(
  s: Sample,
): Array<{ name: string; path: string; sql: string; params: unknown[] }> {
  return [
    {
      name: 'session check (Redis miss only)',
      path: 'every authenticated request, when the session is not cached',
      sql: `select "user_id" from "sessions" where ("sessions"."id" = $1 and "sessions"."revoked_at" is null and "sessions"."expires_at" > $2)`,
      params: [s.sessionId ?? s.userId, new Date()],
    },
    {
      name: 'find rooms, batched (chat_find_rooms)',
      path: 'POST /chatroom/:id/message and every /chatroom/:id route',
      sql: `select * from "chatrooms" where "chatrooms"."id" = any($1::uuid[])`,
      params: [[s.roomId]],
    },
    {
      name: 'users with the tier facts of their subscriptions, batched (users_with_subscriptions)',
      path: 'GET /user/me, and the tier of every prompt',
      sql: `select "users"."id", "users"."mobile", "users"."name", "users"."email", "users"."verified_at" is not null, "users"."password_hash" is not null, "users"."created_at", "subscriptions"."status", "subscriptions"."past_due_since", "subscriptions"."current_period_end", "subscriptions"."cancel_at_period_end" from "users" left join "subscriptions" on "subscriptions"."user_id" = "users"."id" where "users"."id" = any($1::uuid[]) order by "subscriptions"."updated_at" desc`,
      params: [[s.userId]],
    },
    {
      name: 'room list (cache miss)',
      path: 'GET /chatroom on a miss',
      sql: `select * from "chatrooms" where "chatrooms"."user_id" = $1 order by "chatrooms"."last_activity_at" desc, "chatrooms"."id" desc limit $2`,
      params: [s.userId, 500],
    },
    {
      name: 'insert prompt and reply (chat_insert_prompt_reply; chat_insert_prompts_<n> repeats the two rows n times)',
      path: 'POST /chatroom/:id/message',
      sql: `insert into "messages" ("id", "chatroom_id", "user_id", "role", "content", "status", "reply_to_id", "quota_day", "idempotency_key", "created_at", "completed_at")
            values (gen_random_uuid(), $1, $2, 'user', 'explain', 'completed', default, default, null, now(), now()),
                   (gen_random_uuid(), $1, $2, 'assistant', default, 'queued', $3, '2000-01-01', default, now(), default) returning *`,
      params: [s.roomId, s.userId, s.promptId],
    },
    {
      name: 'touch rooms, batched (chat_touch_rooms)',
      path: 'POST /chatroom/:id/message',
      sql: `update "chatrooms" set "last_activity_at" = greatest("chatrooms"."last_activity_at", touched.at) from unnest($1::uuid[], $2::timestamptz[]) as touched(id, at) where ("chatrooms"."id" = touched.id and set_config('synchronous_commit', 'off', true) = 'off')`,
      params: [[s.roomId], [new Date().toISOString()]],
    },
    {
      name: 'start a reply with its prompt and room (chat_start_reply)',
      path: 'worker, every reply',
      sql: `update "messages" set "status" = 'streaming', "started_at" = coalesce("messages"."started_at", $1::timestamptz), "attempts" = "messages"."attempts" + 1, "updated_at" = $2
            from "messages" "prompt" inner join "chatrooms" on "chatrooms"."id" = "prompt"."chatroom_id"
            where ("messages"."id" = $3 and "prompt"."id" = "messages"."reply_to_id" and "messages"."role" = 'assistant' and "messages"."status" in ('queued', 'streaming') and "messages"."cancel_requested_at" is null and set_config('synchronous_commit', 'off', true) = 'off')
            returning "messages".*, "prompt".*, "chatrooms".*`,
      params: [new Date(), new Date(), s.replyId],
    },
    {
      name: 'history (chat_history)',
      path: 'worker, every reply',
      sql: `select "role", "content", "created_at" from "messages" where ("messages"."chatroom_id" = $1 and ("messages"."created_at" < $2::timestamptz or ("messages"."created_at" = $2::timestamptz and "messages"."id" < $3)) and ("messages"."role" = 'user' or "messages"."status" = 'completed')) order by "messages"."created_at" desc, "messages"."id" desc limit $4`,
      params: [s.roomId, s.promptAt, s.promptId, 200],
    },
    {
      name: 'finalize (chat_finalize)',
      path: 'worker, every reply',
      sql: `update "messages" set "status" = 'completed', "content" = 'x', "completed_at" = $1, "updated_at" = $1 where ("messages"."id" = $2 and "messages"."status" in ('queued', 'streaming')) returning *`,
      params: [new Date(), s.replyId],
    },
    {
      name: 'quota day count (Redis counter lost)',
      path: 'first prompt of a user per day after a Redis flush',
      sql: `select count(*)::int from "messages" where ("messages"."user_id" = $1 and "messages"."quota_day" = $2 and "messages"."role" = 'assistant')`,
      params: [s.userId, new Date().toISOString().slice(0, 10)],
    },
    {
      name: 'stale pending replies (sweeper)',
      path: 'sweeper, every 30 s',
      sql: `select "id", "status" from "messages" where ("messages"."status" in ('queued', 'streaming') and "messages"."updated_at" < $1) order by "messages"."updated_at" asc limit $2`,
      params: [new Date(Date.now() - 300_000), 500],
    },
  ];
}

export interface Explained {
  name: string;
  path: string;
  planningMs: number | undefined;
  executionMs: number | undefined;
  /** The plan's node lines, indented as PostgreSQL prints them. */
  plan: string[];
}

export async function explainHotQueries(db: pg.Pool): Promise<Explained[]> {
  const { rows } = await db.query<{
    user_id: string;
    chatroom_id: string;
    id: string;
    reply_to_id: string;
    prompt_at: Date;
  }>(
    `select r.user_id, r.chatroom_id, r.id, r.reply_to_id, p.created_at as prompt_at
     from messages r join messages p on p.id = r.reply_to_id
     where r.role = 'assistant' order by r.created_at desc limit 1`,
  );
  const row = rows[0];
  if (!row) return [];
  const session = await db.query<{ id: string }>(
    'select id from sessions where user_id = $1 limit 1',
    [row.user_id],
  );
  const sample: Sample = {
    userId: row.user_id,
    roomId: row.chatroom_id,
    sessionId: session.rows[0]?.id,
    replyId: row.id,
    promptId: row.reply_to_id,
    promptAt: row.prompt_at,
  };
  // A pending reply for the worker's statements to find.
  await db.query(`update messages set status = 'queued' where id = $1`, [sample.replyId]);
  const out: Explained[] = [];
  const client = await db.connect();
  try {
    for (const query of hotQueries(sample)) {
      await client.query('begin');
      try {
        const result = await client.query<{ 'QUERY PLAN': string }>(
          `explain (analyze, buffers, costs off) ${query.sql}`,
          query.params,
        );
        const lines = result.rows.map((r) => r['QUERY PLAN']);
        const ms = (label: string) => {
          const line = lines.find((l) => l.startsWith(label));
          return line ? Number(/([\d.]+) ms/.exec(line)?.[1]) : undefined;
        };
        out.push({
          name: query.name,
          path: query.path,
          planningMs: ms('Planning Time'),
          executionMs: ms('Execution Time'),
          plan: lines.filter((l) => !/^(Planning|Execution) Time/.test(l)),
        });
      } finally {
        await client.query('rollback');
      }
    }
  } finally {
    client.release();
  }
  return out;
}
