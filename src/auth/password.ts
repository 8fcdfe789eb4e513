import { hash, verify } from '@node-rs/argon2';

/** Argon2id with the library's defaults (m=19 MiB, t=2, p=1), OWASP's minimum recommendation. */
export function hashPassword(password: string): Promise<string> {
  return hash(password);
}

// Verified against when the account does not exist, so a wrong number and a wrong password take
// the same time.
const DUMMY_HASH =
  '$argon2id$v=19$m=19456,t=2,p=1$JFa96T1OYSvekm7lcZSfzw$CXBB7rJw6pOYrEFfsDj2ybQpE18aQyUYIHJrRQrBnqs';

export async function verifyPassword(
  passwordHash: string | null,
  password: string,
): Promise<boolean> {
  try {
    const ok = await verify(passwordHash ?? DUMMY_HASH, password);
    return ok && passwordHash !== null;
  } catch {
    return false;
  }
}
