import Ajv2020Module, { type ValidateFunction } from 'ajv/dist/2020.js';
import addFormatsModule from 'ajv-formats';
import type { Response } from 'light-my-request';
import type { App } from '../../src/api/app.js';

// CommonJS modules: under NodeNext the default import is `module.exports`; the class is `.default`.
const Ajv2020 = Ajv2020Module.default;
const addFormats = addFormatsModule.default;

export type JsonSchema = Record<string, unknown>;

export interface OpenApiOperation {
  security?: unknown[];
  parameters?: Array<{ in: string; name: string; required?: boolean; schema?: JsonSchema }>;
  requestBody?: { required?: boolean; content: Record<string, { schema?: JsonSchema }> };
  responses: Record<
    string,
    { description?: string; content?: Record<string, { schema?: JsonSchema }> }
  >;
}

export interface OpenApiDocument {
  paths: Record<string, Record<string, OpenApiOperation>>;
  components: { schemas: Record<string, JsonSchema> };
}

export interface Operation {
  method: string;
  /** The path template, e.g. `/chatroom/{id}`. */
  path: string;
  operation: OpenApiOperation;
  /** `METHOD /path/{template}` */
  key: string;
}

/** Statuses any route may answer with (parser, auth, routing, limits), documented or not. */
export const UNIVERSAL_STATUSES = [400, 401, 404, 405, 413, 415, 429] as const;

const METHODS = ['get', 'post', 'put', 'patch', 'delete'];

/** Routes that are not part of the API contract: the docs UI, the admin dashboard, metrics, files. */
export function isContractPath(path: string): boolean {
  return !/^\/(docs|admin|metrics|openapi\.json)(\/|$)/.test(path) && !/\.[a-z0-9]+$/i.test(path);
}

export async function fetchOpenApi(app: App): Promise<OpenApiDocument> {
  const res = await app.inject({ url: '/openapi.json' });
  if (res.statusCode !== 200) throw new Error(`/openapi.json answered ${res.statusCode}`);
  return res.json() as OpenApiDocument;
}

/** Every documented (method, path) of the API, in document order. */
export function operationsOf(doc: OpenApiDocument): Operation[] {
  const out: Operation[] = [];
  for (const [path, item] of Object.entries(doc.paths)) {
    if (!isContractPath(path)) continue;
    for (const [method, operation] of Object.entries(item)) {
      if (!METHODS.includes(method)) continue;
      const upper = method.toUpperCase();
      out.push({ method: upper, path, operation, key: `${upper} ${path}` });
    }
  }
  return out;
}

/** The path parameters of a template, in order (`/chatroom/{id}/messages/{messageId}`). */
export function pathParams(path: string): string[] {
  return [...path.matchAll(/\{([^}]+)\}/g)].map((m) => m[1]!);
}

export function fillPath(path: string, values: Record<string, string>): string {
  return path.replace(/\{([^}]+)\}/g, (_, name: string) => {
    const value = values[name];
    if (value === undefined) throw new Error(`no value for {${name}} in ${path}`);
    return value;
  });
}

/** Resolves a local `$ref` (`#/components/schemas/X`) against the document. */
export function deref(
  doc: OpenApiDocument,
  schema: JsonSchema | undefined,
): JsonSchema | undefined {
  let current = schema;
  for (let i = 0; current && typeof current.$ref === 'string' && i < 10; i++) {
    const name = (current.$ref as string).replace('#/components/schemas/', '');
    current = doc.components.schemas[name];
  }
  return current;
}

export const isErrorBody = (body: unknown): boolean => {
  if (!body || typeof body !== 'object') return false;
  const keys = Object.keys(body);
  if (keys.length !== 1 || keys[0] !== 'error') return false;
  const error = (body as { error: unknown }).error;
  if (!error || typeof error !== 'object') return false;
  const e = error as Record<string, unknown>;
  return (
    Object.keys(e).sort().join(',') === 'code,details,message,requestId' &&
    typeof e.code === 'string' &&
    /^[A-Z_]+$/.test(e.code) &&
    typeof e.message === 'string' &&
    e.message.length > 0 &&
    typeof e.requestId === 'string' &&
    e.requestId.length > 0 &&
    !!e.details &&
    typeof e.details === 'object' &&
    !Array.isArray(e.details)
  );
};

const escapePointer = (segment: string) => segment.replace(/~/g, '~0').replace(/\//g, '~1');

/**
 * The contract of the OpenAPI document: finds the operation of a request and validates a real
 * response against the schema the document declares for its status and content type.
 */
export class OpenApiContract {
  readonly operations: Operation[];
  private readonly ajv: InstanceType<typeof Ajv2020>;
  private readonly validators = new Map<string, ValidateFunction>();
  private readonly matchers: Array<{ operation: Operation; pattern: RegExp }>;

  constructor(readonly doc: OpenApiDocument) {
    this.operations = operationsOf(doc);
    this.ajv = new Ajv2020({ strict: false, allErrors: true, validateSchema: false });
    addFormats(this.ajv);
    // The whole document is one schema resource, so `#/components/schemas/*` refs resolve in it.
    this.ajv.addSchema({ ...doc, $id: 'openapi.json' } as JsonSchema);
    this.matchers = this.operations.map((operation) => ({
      operation,
      pattern: new RegExp(
        `^${operation.path.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\{[^}]+\}/g, '[^/]+')}/?$`,
      ),
    }));
  }

  /** The operation a request goes to (a templated path matches any segment). */
  find(method: string, url: string): Operation | undefined {
    const path = url.split('?')[0]!;
    const upper = method.toUpperCase();
    // Literal paths first: `/chatroom/{id}` must not swallow a literal sibling.
    const candidates = this.matchers.filter(
      (m) => m.operation.method === upper && m.pattern.test(path),
    );
    candidates.sort(
      (a, b) => pathParams(a.operation.path).length - pathParams(b.operation.path).length,
    );
    return candidates[0]?.operation;
  }

  documentedStatuses(operation: Operation): number[] {
    return Object.keys(operation.operation.responses).map(Number);
  }

  private validator(operation: Operation, status: number, mediaType: string): ValidateFunction {
    const pointer = [
      'paths',
      operation.path,
      operation.method.toLowerCase(),
      'responses',
      String(status),
      'content',
      mediaType,
      'schema',
    ]
      .map(escapePointer)
      .join('/');
    const ref = `openapi.json#/${pointer}`;
    const cached = this.validators.get(ref);
    if (cached) return cached;
    const validate = this.ajv.compile({ $ref: ref });
    this.validators.set(ref, validate);
    return validate;
  }

  /**
   * Problems of a real response against the document: an undocumented status, a content type the
   * document does not declare, a body that does not match the declared schema. Empty when fine.
   */
  check(operation: Operation, res: Response): string[] {
    const label = `${operation.key} → ${res.statusCode}`;
    const declared = operation.operation.responses[String(res.statusCode)];
    if (!declared) {
      return [
        `${label}: status not documented (documented: ${this.documentedStatuses(operation).join(', ')}) body=${res.body.slice(0, 300)}`,
      ];
    }
    const contentType = String(res.headers['content-type'] ?? '');
    const mediaType = contentType.split(';')[0]!.trim().toLowerCase();
    if (!declared.content) {
      return res.body.length === 0
        ? []
        : [`${label}: documented without a body, got ${contentType}`];
    }
    if (!(mediaType in declared.content)) {
      return [
        `${label}: content type ${contentType || '(none)'} not documented (${Object.keys(declared.content).join(', ')})`,
      ];
    }
    if (mediaType !== 'application/json') return [];
    let body: unknown;
    try {
      body = JSON.parse(res.body);
    } catch {
      return [`${label}: body is not JSON: ${res.body.slice(0, 200)}`];
    }
    const validate = this.validator(operation, res.statusCode, mediaType);
    if (validate(body)) return [];
    return [
      `${label}: body does not match its schema: ${this.ajv.errorsText(validate.errors)}; body=${res.body.slice(0, 500)}`,
    ];
  }
}
