import pg from 'pg';
import type { ServedRequest } from './fake-llm.js';
import type { FaultRecord } from './faults.js';
import type { Traffic } from './http.js';
import { type ChaosUser, FINAL, type Ledger } from './load.js';

export interface Row {
  id: string;
  role: 'user' | 'assistant';
  status: string;
  reply_to_id: string | null;
  user_id: string;
  quota_day: string | null;
  content: string;
  attempts: number;
  created_at: Date;
  updated_at: Date;
  completed_at: Date | null;
  error: { code?: string } | null;
}

export async function loadMessages(url: string): Promise<Row[]> {
  const client = new pg.Client({ connectionString: url });
  client.on('error', () => {});
  await client.connect();
  try {
    const { rows } = await client.query<Row>(
      `select id, role, status, reply_to_id, user_id, quota_day, content, attempts, created_at,
              updated_at, completed_at, error
         from messages order by created_at, id`,
    );
    return rows;
  } finally {
    await client.end();
  }
}

export async function pendingCount(url: string): Promise<number> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 2000 });
  client.on('error', () => {});
  await client.connect();
  try {
    const { rows } = await client.query<{ n: number }>(
      `select count(*)::int as n from messages where status in ('queued', 'streaming')`,
    );
    return rows[0]?.n ?? 0;
  } finally {
    await client.end();
  }
}

export interface Verification {
  accepted: number;
  acceptedPrompts: number;
  acceptedRegenerations: number;
  outcomes: Record<string, number>;
  lost: Array<{ replyId: string; promptId: string; reason: string }>;
  duplicated: Array<{ promptId: string; replies: number; requested: number; uncertain: number }>;
  stuck: Array<{ id: string; status: string; attempts: number; updatedAt: string }>;
  /** Prompts in PostgreSQL without any reply (the send transaction stores both, so never). */
  promptsWithoutReply: string[];
  /** Completed replies whose text is not one the model sent in full for that prompt. */
  corrupted: Array<{ replyId: string; content: string }>;
  /** A client saw a final status that differs from the stored one. */
  inconsistent: Array<{ replyId: string; client: string; stored: string }>;
  quota: {
    limit: number;
    basicUsers: number;
    maxCountedPerUserDay: number;
    maxAcceptedByClientPerUser: number;
    violations: Array<{ userId: string; day: string; counted: number }>;
    basicRejections: number;
    proRejections: number;
  };
  /** Sends whose answer never came, and how many of them PostgreSQL does hold. */
  unknownSends: { total: number; stored: number };
  totals: { messages: number; prompts: number; replies: number; attempts: Record<string, number> };
}

export function verify(
  rows: Row[],
  ledger: Ledger,
  served: ServedRequest[],
  users: ChaosUser[],
  basicLimit: number,
): Verification {
  const byId = new Map(rows.map((r) => [r.id, r]));
  const repliesOf = repliesByPrompt(rows);

  const outcomes: Record<string, number> = {};
  const lost: Verification['lost'] = [];
  const inconsistent: Verification['inconsistent'] = [];
  let acceptedPrompts = 0;
  let acceptedRegenerations = 0;
  for (const a of ledger.accepted.values()) {
    if (a.kind === 'prompt') acceptedPrompts++;
    else acceptedRegenerations++;
    const row = byId.get(a.replyId);
    if (!row) {
      lost.push({ replyId: a.replyId, promptId: a.promptId, reason: 'missing from PostgreSQL' });
      continue;
    }
    if (row.reply_to_id !== a.promptId || row.role !== 'assistant') {
      lost.push({
        replyId: a.replyId,
        promptId: a.promptId,
        reason: 'stored under another prompt',
      });
      continue;
    }
    outcomes[row.status] = (outcomes[row.status] ?? 0) + 1;
    if (!FINAL.has(row.status)) {
      lost.push({
        replyId: a.replyId,
        promptId: a.promptId,
        reason: `never final (${row.status})`,
      });
    }
    if (a.clientFinal && a.clientFinal !== row.status) {
      inconsistent.push({ replyId: a.replyId, client: a.clientFinal, stored: row.status });
    }
  }

  const duplicated: Verification['duplicated'] = [];
  for (const p of ledger.prompts.values()) {
    const replies = repliesOf.get(p.promptId)?.length ?? 0;
    if (replies > p.requested + p.uncertain) {
      duplicated.push({
        promptId: p.promptId,
        replies,
        requested: p.requested,
        uncertain: p.uncertain,
      });
    }
  }
  // Prompts the clients never saw accepted (their answer was lost) count too: one reply each,
  // unless regenerated (only done on accepted prompts).
  const promptsWithoutReply: string[] = [];
  for (const r of rows) {
    if (r.role !== 'user') continue;
    const replies = repliesOf.get(r.id)?.length ?? 0;
    if (replies === 0) promptsWithoutReply.push(r.id);
    if (!ledger.prompts.has(r.id) && replies > 1) {
      duplicated.push({ promptId: r.id, replies, requested: 1, uncertain: 0 });
    }
  }

  const stuck = rows
    .filter((r) => r.role === 'assistant' && !FINAL.has(r.status))
    .map((r) => ({
      id: r.id,
      status: r.status,
      attempts: r.attempts,
      updatedAt: r.updated_at.toISOString(),
    }));

  // Every completed reply must be, word for word, a text the model sent in full for its prompt.
  const textsByPrompt = new Map<string, Set<string>>();
  for (const s of served) {
    if (s.kind !== 'text' || s.text === undefined || s.aborted || s.finishedAt === undefined)
      continue;
    const set = textsByPrompt.get(s.prompt) ?? new Set<string>();
    set.add(s.text);
    textsByPrompt.set(s.prompt, set);
  }
  const corrupted: Verification['corrupted'] = [];
  for (const r of rows) {
    if (r.role !== 'assistant' || r.status !== 'completed' || !r.reply_to_id) continue;
    const prompt = byId.get(r.reply_to_id);
    if (!prompt || !textsByPrompt.get(prompt.content)?.has(r.content)) {
      corrupted.push({ replyId: r.id, content: r.content.slice(0, 120) });
    }
  }

  // The daily limit: replies still counted against a Basic user's day (failed ones are given
  // back and have quota_day null) never exceed it.
  const basicIds = new Set(users.filter((u) => u.tier === 'basic').map((u) => u.id));
  const counted = new Map<string, number>();
  for (const r of rows) {
    if (r.role !== 'assistant' || !r.quota_day || !basicIds.has(r.user_id)) continue;
    const key = `${r.user_id}|${r.quota_day}`;
    counted.set(key, (counted.get(key) ?? 0) + 1);
  }
  const violations: Verification['quota']['violations'] = [];
  let maxCounted = 0;
  for (const [key, n] of counted) {
    maxCounted = Math.max(maxCounted, n);
    if (n > basicLimit) {
      const [userId = '', day = ''] = key.split('|');
      violations.push({ userId, day, counted: n });
    }
  }
  const acceptedPerBasic = new Map<string, number>();
  for (const a of ledger.accepted.values()) {
    if (a.tier === 'basic')
      acceptedPerBasic.set(a.userId, (acceptedPerBasic.get(a.userId) ?? 0) + 1);
  }

  const contents = new Set(rows.filter((r) => r.role === 'user').map((r) => r.content));
  const attempts: Record<string, number> = {};
  for (const r of rows) {
    if (r.role !== 'assistant') continue;
    const key = r.attempts >= 3 ? '3+' : String(r.attempts);
    attempts[key] = (attempts[key] ?? 0) + 1;
  }

  return {
    accepted: ledger.accepted.size,
    acceptedPrompts,
    acceptedRegenerations,
    outcomes,
    lost,
    duplicated,
    stuck,
    promptsWithoutReply,
    corrupted,
    inconsistent,
    quota: {
      limit: basicLimit,
      basicUsers: basicIds.size,
      maxCountedPerUserDay: maxCounted,
      maxAcceptedByClientPerUser: Math.max(0, ...acceptedPerBasic.values()),
      violations,
      basicRejections: ledger.quotaRejections.basic,
      proRejections: ledger.quotaRejections.pro,
    },
    unknownSends: {
      total: ledger.unknownSends.length,
      stored: ledger.unknownSends.filter((u) => contents.has(u.content)).length,
    },
    totals: {
      messages: rows.length,
      prompts: rows.filter((r) => r.role === 'user').length,
      replies: rows.filter((r) => r.role === 'assistant').length,
      attempts,
    },
  };
}

export interface ReadySample {
  t: number;
  ok: boolean;
}

export interface Recovery {
  kind: string;
  description: string;
  atSeconds: number;
  downtimeMs: number;
  /** First prompt accepted from a request sent after the fault. */
  firstAcceptedMs: number | null;
  /** First reply completed whose prompt was sent after the fault. */
  firstCompletedMs: number | null;
  /** Redis/PostgreSQL faults: first moment every API answered /readyz 200 again. */
  readyMs: number | null;
  /** Answers of 503 and connection errors from the fault until the next one. */
  errorsUntilNext: { unavailable: number; connection: number };
  details: Record<string, unknown>;
}

export function recoveries(
  faults: FaultRecord[],
  loadStart: number,
  rows: Row[],
  ledger: Ledger,
  traffic: Traffic,
  ready: ReadySample[],
): Recovery[] {
  const byId = new Map(rows.map((r) => [r.id, r]));
  const promptByContent = new Map<string, Row>();
  for (const r of rows) if (r.role === 'user') promptByContent.set(r.content, r);
  const repliesOf = repliesByPrompt(rows);
  const accepted = [...ledger.accepted.values()];

  return faults.map((f, i) => {
    const next = faults[i + 1]?.at ?? Number.POSITIVE_INFINITY;
    const after = accepted.filter((a) => a.kind === 'prompt' && a.sentAt >= f.at);
    const firstAccepted = Math.min(...after.map((a) => a.acceptedAt));
    const completedTimes = after
      .map((a) => byId.get(a.replyId))
      .filter((r): r is Row => r?.status === 'completed' && r.completed_at !== null)
      .map((r) => r.completed_at!.getTime());
    const firstCompleted = Math.min(...completedTimes);
    // Only Redis and PostgreSQL make /readyz fail; the other faults leave the APIs ready.
    const readyAt = /^(redis|postgres)/.test(f.kind)
      ? ready.find((s) => s.t >= f.restoredAt && s.ok)?.t
      : undefined;
    let unavailable = 0;
    let connection = 0;
    for (const s of traffic.samples) {
      if (s.doneAt < f.at || s.doneAt >= next) continue;
      if (s.status === 503) unavailable++;
      if (s.status === 0) connection++;
    }
    const details: Record<string, unknown> = { ...f.details };
    if (f.orphanPrompts) {
      // The replies the killed worker was generating: when were they all final?
      const replies = f.orphanPrompts.flatMap((p) => {
        const prompt = promptByContent.get(p);
        return prompt ? (repliesOf.get(prompt.id) ?? []) : [];
      });
      const finals = replies.filter((r) => FINAL.has(r.status) && r.completed_at);
      details.cutOffRepliesFinal = `${finals.length}/${replies.length}`;
      details.cutOffRepliesStatuses = countBy(replies.map((r) => r.status));
      details.cutOffRepliesAllFinalMs =
        finals.length > 0 && finals.length === replies.length
          ? Math.max(...finals.map((r) => r.completed_at!.getTime())) - f.at
          : null;
    }
    if (f.interrupted) {
      const resumed = f.interrupted.filter((s) => s.finalAt !== undefined);
      details.interruptedStreamsFinished = `${resumed.length}/${f.interrupted.length}`;
      details.interruptedStreamsAllFinishedMs =
        resumed.length > 0 && resumed.length === f.interrupted.length
          ? Math.max(...resumed.map((s) => s.finalAt!)) - f.at
          : null;
    }
    return {
      kind: f.kind,
      description: f.description,
      atSeconds: Math.round((f.at - loadStart) / 100) / 10,
      downtimeMs: f.restoredAt - f.at,
      firstAcceptedMs: Number.isFinite(firstAccepted) ? firstAccepted - f.at : null,
      firstCompletedMs: Number.isFinite(firstCompleted) ? firstCompleted - f.at : null,
      readyMs: readyAt !== undefined ? readyAt - f.at : null,
      errorsUntilNext: { unavailable, connection },
      details,
    };
  });
}

/** Each prompt's assistant rows (its replies and regenerations), by the prompt's id. */
function repliesByPrompt(rows: Row[]): Map<string, Row[]> {
  const repliesOf = new Map<string, Row[]>();
  for (const r of rows) {
    if (r.role !== 'assistant' || !r.reply_to_id) continue;
    const list = repliesOf.get(r.reply_to_id) ?? [];
    list.push(r);
    repliesOf.set(r.reply_to_id, list);
  }
  return repliesOf;
}

function countBy(values: string[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const v of values) out[v] = (out[v] ?? 0) + 1;
  return out;
}

/**
 * What the suite can see of a reply that never became final: its row, its BullMQ job and lock,
 * its Redis Stream, and the model requests made for its prompt (who was generating it when?).
 */
export async function diagnose(
  ids: string[],
  rows: Row[],
  served: ServedRequest[],
  redisPort: number,
  redisPrefix: string,
): Promise<Array<Record<string, unknown>>> {
  const { redisCommand } = await import('../helpers/redis-instance.js');
  const byId = new Map(rows.map((r) => [r.id, r]));
  const redis = (args: string[]) => redisCommand(redisPort, args).catch((e: Error) => e.message);
  const out: Array<Record<string, unknown>> = [];
  for (const id of ids.slice(0, 10)) {
    const row = byId.get(id);
    const prompt = row?.reply_to_id ? byId.get(row.reply_to_id) : undefined;
    const bull = `${redisPrefix}bull:replies`;
    const states: string[] = [];
    for (const list of ['wait', 'active', 'paused']) {
      if ((await redis(['LPOS', `${bull}:${list}`, id])) !== null) states.push(list);
    }
    for (const set of ['delayed', 'completed', 'failed', 'prioritized']) {
      if ((await redis(['ZSCORE', `${bull}:${set}`, id])) !== null) states.push(set);
    }
    const last = await redis(['XREVRANGE', `${redisPrefix}reply:${id}`, '+', '-', 'COUNT', '1']);
    out.push({
      id,
      status: row?.status,
      attempts: row?.attempts,
      createdAt: row?.created_at.toISOString(),
      updatedAt: row?.updated_at.toISOString(),
      job: {
        exists: await redis(['EXISTS', `${bull}:${id}`]),
        states,
        lockTtlMs: await redis(['PTTL', `${bull}:${id}:lock`]),
        attemptsMade: await redis(['HGET', `${bull}:${id}`, 'attemptsMade']),
      },
      stream: {
        length: await redis(['XLEN', `${redisPrefix}reply:${id}`]),
        last: JSON.stringify(last).slice(0, 200),
      },
      modelRequests: served
        .filter((s) => prompt && s.prompt === prompt.content)
        .map((s) => ({
          kind: s.kind,
          receivedAt: new Date(s.receivedAt).toISOString(),
          finishedAt: s.finishedAt ? new Date(s.finishedAt).toISOString() : null,
          closedAt: s.closedAt ? new Date(s.closedAt).toISOString() : null,
          aborted: s.aborted,
        })),
    });
  }
  return out;
}
