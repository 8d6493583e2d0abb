// proxy.ts — remote MCP proxy: stdio MCP servers → Streamable HTTP + legacy HTTP+SSE.
//
// Reads a claude_desktop_config.json-style file, spawns each configured stdio MCP server and serves it at
// /{name}/mcp (Streamable HTTP, spec 2025-03-26 … 2025-11-25, and the sessionless 2026-07-28 revision on the
// same URL) and /{name}/sse (HTTP+SSE, spec 2024-11-05).
// One child per server is shared by every client session; request ids and progress tokens are rewritten so
// each response reaches only the session that asked.
//
// With a consent passphrase it is also an OAuth 2.1 authorization server (section 9), so that Claude.ai's
// connectors can log in; static bearer tokens work beside it.
//
// Needs: listen on one TCP port, spawn the configured commands, read the config file (and secret files it
// names), write its OAuth state file. Makes no outbound connections (the one exception, client ID metadata
// documents, is off unless the operator names the hosts) and has no runtime dependencies: only `node:` built-ins.
//
// Threat model:
//   - Clients are untrusted: every body, header and id is validated; every buffer, queue, map, connection and
//     nesting depth is bounded (section 1). Error text sent to clients is fixed; details go to the log only.
//     Nothing a client or a child sends can crash the process: every request and every child event runs
//     inside an error boundary, and should the process die anyway, every child group is killed with it.
//   - Sessions are isolated: a session is bound to the credential that opened it; answers, progress and
//     child→client requests reach only the session they belong to, or nobody (never a guess).
//   - A client cannot widen a server's sandbox: clients' roots never reach children (section 6).
//   - A DNS-rebinding page must not reach a loopback proxy: Origin is checked on every request and Host on
//     loopback binds (spec 2025-11-25 basic/transports §Security Warning).
//   - Exposing unauthenticated servers on a public interface is refused unless the operator says so.
//     Bearer tokens are compared in constant time and never logged; client tokens never reach children.
//   - Children are trusted as much as the operator's config trusts them, but their output is not: a child
//     that prints garbage, huge lines or dies is logged, contained and restarted.
//   - Secrets expanded into a child's environment (${VAR}, ${file:…}) and bearer tokens are never logged:
//     every log line is masked (each line of a secret and its JSON-escaped form) and control characters
//     are escaped, so neither a child nor a client can forge or hide a log line.
//   - Children that crash are reaped with their whole process group (SIGTERM, then SIGKILL by the clock).
//   - Not handled: descendants of a child that call setsid() leave its process group and escape our kill.
//
// Contents
//   1. Limits and defaults                7. HTTP: guards, /mcp, /sse, health
//   2. Types                              8. MCP 2026-07-28: sessionless requests, discover, listen, input requests
//   3. Small utilities                    9. Operator controls: tool policy, request timeouts, rate limits, audit log
//   4. Config: load, validate, diff      10. OAuth: metadata, registration, consent, tokens
//   5. Children: spawn, framing, restart, kill
//   6. Sessions and id routing           11. Operations: metrics and status page
//                                        12. Lifecycle: start, reload, shutdown
//                                        13. Doctor: replay Claude.ai's connect
//                                        14. CLI and main

import { spawn, type ChildProcess } from 'node:child_process';
import { X509Certificate, createHash, createHmac, createPrivateKey, randomBytes, scryptSync, timingSafeEqual } from 'node:crypto';
import { accessSync, closeSync, constants as fsConstants, fchmodSync, fstatSync, fsyncSync, mkdirSync, openSync, readdirSync, readSync, realpathSync, renameSync, statSync, watch, writeSync, type FSWatcher } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { lookup as dnsLookup } from 'node:dns';
import { BlockList, isIP, type Socket } from 'node:net';
import { constants as osConstants, homedir } from 'node:os';
import { basename, delimiter, dirname, isAbsolute, join, resolve as resolvePath, sep } from 'node:path';
import { createSecureContext } from 'node:tls';
import { pathToFileURL } from 'node:url';

// ── 1. Limits and defaults ──────────────────────────────────────────────────────────────────────────────

const MIB = 1024 * 1024;

/** Every bound the proxy enforces. Tests shrink them through `startProxy(…, { limits })`. */
export type Limits = {
  /** POST body cap. The SDK's SSE server uses 4 MB; supergateway's 100 KB broke real tool arguments. */
  maxBodyBytes: number;
  /** One line of child stdout. The SDK's stdio reader caps at 10 MiB (STDIO_DEFAULT_MAX_BUFFER_SIZE). */
  maxLineBytes: number;
  /** A child's stderr line is cut to this before it reaches our log. */
  maxStderrLineBytes: number;
  /** Sessions per server. Claude.ai opens a new session for nearly every exchange (github.com/anthropics/claude-ai-mcp/issues/583). */
  maxSessionsPerServer: number;
  /**
   * Sessions one credential may hold on one server (anonymous excepted: without auth there is nobody to tell
   * apart). At it, the credential's own least recently active idle session gives way, never another's.
   */
  maxSessionsPerCredential: number;
  /**
   * MCP requests per minute per credential per server, a token bucket refilled evenly, holding at most
   * requestBurst (anonymous excepted). Settable per server ("rateLimit"). Over it: 429 with Retry-After.
   */
  requestsPerMinute: number;
  requestBurst: number;
  /** Requests in flight per session; one runaway client cannot fill the child's id space. */
  maxPendingPerSession: number;
  /** Messages in one JSON-RPC batch (2025-03-26 clients). The SDK server refuses more than 100. */
  maxBatchSize: number;
  /** Answers of one batch held until its last answer comes (a batch is answered as one body). */
  maxBatchAnswerBytes: number;
  /** resources/subscribe URIs one session may hold; each is kept (and re-sent after a restart) until released. */
  maxSubscriptionsPerSession: number;
  /** Length of a subscribed URI, in characters. */
  maxSubscriptionUriChars: number;
  /**
   * Bytes one connection may hold queued and unread (an SSE stream, or JSON answers to a client that does not
   * read them): the next write to a connection past this closes it. Checked before a write, so one message
   * larger than this still reaches a client that reads.
   */
  maxQueuedBytesPerConnection: number;
  /** Bytes queued unread across every connection; past it the connections holding the most are closed. */
  maxQueuedBytesTotal: number;
  /** Request-body bytes being read or parsed at once across the proxy (JSON.parse blocks the event loop). */
  maxBodyBytesInFlight: number;
  /** Nesting of arrays and objects in one message; deeper would overflow the stack in JSON.stringify. */
  maxJsonDepth: number;
  /** Open client connections; each holds a file descriptor, and children need some to be restarted. */
  maxConnections: number;
  /** Bytes queued on one child's stdin before new requests are refused (backpressure toward the child). */
  maxChildQueueBytes: number;
  /** Children of one server in "per-session" mode. */
  maxChildrenPerServer: number;
  /** …of which one credential (a token; everyone, without auth) may hold this many. */
  maxChildrenPerCredential: number;
  /** Child→client requests (sampling, elicitation) one child may have waiting for a client's answer. */
  maxServerRequestsPerChild: number;
  /** A Streamable HTTP session with no request and no open stream for this long expires (then 404). */
  sessionIdleMs: number;
  /** Period of the single sweep that expires idle sessions and overdue requests (no per-session timers). */
  sweepIntervalMs: number;
  /** Comment sent on every open SSE stream so proxies and load balancers keep it open (SDK: 15 s). */
  sseKeepaliveMs: number;
  /** A child must answer initialize within this. Generous: `npx -y` may install the package first. */
  initTimeoutMs: number;
  /**
   * A request the child has not answered gets an error after this (checked every sweepIntervalMs), the child
   * a cancel. Claude.ai gives a tool call 300 s (claude.com/docs/connectors/faq); an answer after that reaches nobody.
   */
  requestTimeoutMs: number;
  /** A 2026-07-28 request (server/discover first of all) waits this long for a starting server before 503. */
  startWaitMs: number;
  /**
   * A call answered input_required is held this long for the client's retry; then the child's requests are
   * answered with an error and the call finishes without its client. It holds its child's lane meanwhile.
   */
  continuationTtlMs: number;
  /** ttlMs stamped on 2026-07-28 list results and server/discover (list_changed on a listen stream invalidates). */
  listTtlMs: number;
  /** Requests waiting for a shared child's lane (servers with "clientCapabilities": see section 8)… */
  maxLaneQueue: number;
  /** …of which one credential may have this many. */
  maxLaneQueuePerCredential: number;
  /** 2026-07-28 subscriptions/listen streams one credential may hold open on one server. */
  maxListenersPerCredential: number;
  /** Distinct resource URIs subscribed on one child, over every session and listen stream. */
  maxSubscribedUrisPerChild: number;
  /** Each step of stopping a child: stdin closed → wait → SIGTERM → wait → SIGKILL (SDK: 2 s steps). */
  killGraceMs: number;
  /** Restart backoff starts here (runit: 1 s) … */
  restartMinDelayMs: number;
  /** … doubles up to here … */
  restartMaxDelayMs: number;
  /** … and resets after a run this long (pm2's min_uptime). */
  stableUptimeMs: number;
  /** After this many unstable restarts in a row the server is marked errored and answers 503. */
  maxUnstableRestarts: number;
  /** Children initializing at once, so twenty `npx -y` installs do not start together. */
  startConcurrency: number;
  /** Retry-After on a 503 while a server is starting or restarting. */
  retryAfterS: number;
  /** Node's own: time to receive request headers (slowloris). */
  headersTimeoutMs: number;
  /** Node's own: time to receive a whole request. */
  httpRequestTimeoutMs: number;
  /** Node's own: idle keep-alive socket lifetime. */
  keepAliveTimeoutMs: number;
  /** Node's own: request headers counted. Node drops the rest silently, so a request reaching it gets 431. */
  maxHeadersCount: number;
  /** Node's own: how often it enforces the two timeouts above (its default, 30 s, made them 30 s late). */
  connectionsCheckIntervalMs: number;
  /** On SIGTERM, requests in flight get this long to be answered before children are stopped (a second signal: at once). */
  drainGraceMs: number;
  /** After a failed certificate reload (--tls-cert/--tls-key), how long until it is tried again without an event. */
  tlsRetryMs: number;
  /** Shutdown never takes longer than this (after the drain), whatever the children do. */
  shutdownTimeoutMs: number;
  // OAuth (section 9). Claude.ai registers a client on every new connection, so clients are many and cheap.
  /** Registered OAuth clients; at the cap the oldest one without a grant gives way. */
  maxOAuthClients: number;
  /** A registered client that never got a grant is forgotten after this. */
  unusedClientMs: number;
  /** Grants (approved client × server, with their tokens). */
  maxOAuthGrants: number;
  /** Consent pages shown and not yet answered, and the time one stays valid. */
  maxPendingConsents: number;
  consentTtlMs: number;
  /** Authorization codes issued and not yet expired, and their lifetime (RFC 6749 §4.1.2 suggests 10 min at most). */
  maxAuthCodes: number;
  authCodeTtlMs: number;
  /** Access tokens are short-lived; refresh tokens rotate and expire unused after this. */
  accessTokenTtlMs: number;
  refreshTokenTtlMs: number;
  /** Bodies of /register, /token, /authorize and /revoke. */
  maxOAuthBodyBytes: number;
  /** Registrations per client address per minute. */
  registrationsPerMinute: number;
  /** Wrong passphrases per client address per window; past it the consent page answers 429. */
  loginFailuresPerWindow: number;
  /** …and from all addresses together; past it only addresses with no wrong one may still try. */
  loginFailuresTotalPerWindow: number;
  /** Consent pages one client address may open per minute (each holds an entry until answered or expired). */
  consentPagesPerMinute: number;
  /** POSTs to /token and /revoke per client address per minute (Claude refreshes at most a few times an hour). */
  tokenRequestsPerMinute: number;
  loginFailureWindowMs: number;
  /** Addresses tracked by the two rate limits above. */
  maxRateLimitedAddresses: number;
  /** The OAuth state file. */
  maxStateFileBytes: number;
};

export const DEFAULT_LIMITS: Readonly<Limits> = Object.freeze({
  maxBodyBytes: 4 * MIB,
  maxLineBytes: 10 * MIB,
  maxStderrLineBytes: 4096,
  maxSessionsPerServer: 20_000,
  maxSessionsPerCredential: 2_000,
  requestsPerMinute: 1_200,
  requestBurst: 200,
  maxPendingPerSession: 1024,
  maxBatchSize: 100,
  maxBatchAnswerBytes: 16 * MIB,
  maxSubscriptionsPerSession: 256,
  maxSubscriptionUriChars: 2048,
  maxQueuedBytesPerConnection: 4 * MIB,
  maxQueuedBytesTotal: 64 * MIB,
  maxBodyBytesInFlight: 16 * MIB,
  maxJsonDepth: 128,
  maxConnections: 16_384,
  maxChildQueueBytes: 16 * MIB,
  maxChildrenPerServer: 16,
  maxChildrenPerCredential: 8,
  maxServerRequestsPerChild: 64,
  sessionIdleMs: 30 * 60_000,
  sweepIntervalMs: 10_000,
  sseKeepaliveMs: 15_000,
  initTimeoutMs: 120_000,
  requestTimeoutMs: 300_000,
  startWaitMs: 30_000,
  continuationTtlMs: 2 * 60_000,
  listTtlMs: 60_000,
  maxLaneQueue: 256,
  maxLaneQueuePerCredential: 64,
  maxListenersPerCredential: 32,
  maxSubscribedUrisPerChild: 4096,
  killGraceMs: 2_000,
  restartMinDelayMs: 1_000,
  restartMaxDelayMs: 30_000,
  stableUptimeMs: 10_000,
  maxUnstableRestarts: 5,
  startConcurrency: 4,
  retryAfterS: 5,
  headersTimeoutMs: 10_000,
  httpRequestTimeoutMs: 60_000,
  keepAliveTimeoutMs: 5_000,
  maxHeadersCount: 100,
  connectionsCheckIntervalMs: 1_000,
  drainGraceMs: 5_000,
  tlsRetryMs: 60_000,
  shutdownTimeoutMs: 10_000,
  maxOAuthClients: 1_000,
  unusedClientMs: 24 * 3_600_000,
  maxOAuthGrants: 1_000,
  maxPendingConsents: 256,
  consentTtlMs: 10 * 60_000,
  maxAuthCodes: 256,
  authCodeTtlMs: 60_000,
  accessTokenTtlMs: 3_600_000,
  refreshTokenTtlMs: 30 * 24 * 3_600_000,
  maxOAuthBodyBytes: 16 * 1024,
  registrationsPerMinute: 30,
  loginFailuresPerWindow: 5,
  loginFailuresTotalPerWindow: 50,
  consentPagesPerMinute: 30,
  tokenRequestsPerMinute: 120,
  loginFailureWindowMs: 15 * 60_000,
  maxRateLimitedAddresses: 10_000,
  maxStateFileBytes: 8 * MIB,
});

const DEFAULT_HOST = '127.0.0.1';
const DEFAULT_PORT = 8080;
const DEFAULT_CONFIG_PATH = './config.json';
const PROXY_NAME = 'remote-mcp-proxy';
const PROXY_VERSION = '0.1.0';
/**
 * Any config name is accepted ("MCP SQLite Server", as real READMEs write them); its URL segment is derived
 * (serverSegment) and must be unique. Names longer than this are refused: they are shown in every log line.
 */
const MAX_SERVER_NAME_CHARS = 200;
/** A URL segment is also a DNS label in host routes ({segment}.{baseDomain}). */
const MAX_SEGMENT_CHARS = 63;
/** stderr lines kept per child to say why it gave up (npm's closing "A complete log…" line is not one). */
const STDERR_REASON_LINES = 5;
const NPM_LOG_POINTER_RE = /^npm (?:error|ERR!) A complete log of this run can be found in/;
/** Bytes of an offending line shown in the log: enough to recognise it, never the payload. */
const LOG_HEAD_BYTES = 80;
/** How long browsers may cache a CORS preflight answer. */
const CORS_MAX_AGE_S = 600;
/** Child lines at least this long are passed to clients as the child's bytes (see withId); shorter ones as text. */
const RAW_PASSTHROUGH_MIN_BYTES = 16 * 1024;
/** Step of the few bounded polls (a process group emptying has no event). */
const POLL_STEP_MS = 20;
/** Entropy of session ids: 32 random bytes, base64url (visible ASCII, spec basic/transports §Session Management). */
const SESSION_ID_BYTES = 32;
/** File descriptors kept free below the process limit when capping connections: children's pipes need them. */
const FD_RESERVE = 512;
/** Files read whole: the config, a token file, a ${file:} secret. /dev/zero must not hang start-up. */
const MAX_CONFIG_FILE_BYTES = MIB;
const MAX_SECRET_FILE_BYTES = 64 * 1024;
/** A per-server maxLineBytes may not exceed this: V8 cannot make a string of more than ~512 Mi characters. */
const MAX_LINE_BYTES_CEILING = 256 * MIB;
/** Node's timers take at most this; a larger delay silently becomes 1 ms. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** The limits that become timer delays (the other durations are only compared with the clock). */
const TIMER_LIMITS: ReadonlySet<string> = new Set([
  'sweepIntervalMs', 'sseKeepaliveMs', 'initTimeoutMs', 'startWaitMs', 'continuationTtlMs', 'killGraceMs', 'restartMinDelayMs', 'restartMaxDelayMs',
  'headersTimeoutMs', 'httpRequestTimeoutMs', 'keepAliveTimeoutMs', 'connectionsCheckIntervalMs', 'shutdownTimeoutMs', 'tlsRetryMs',
]);
/** Below this many connections the operator is warned at start (a low descriptor limit). */
const FEW_CONNECTIONS = 64;
/** Requests given up on but maybe still running, remembered per child (see Upstream.abandoned). */
const MAX_ABANDONED_TRACKED = 4096;
/**
 * How long a request given up on is presumed to be running still. A child that honours the cancellation stops
 * at once; one that ignores it and then asks a client something within this time is refused rather than
 * guessed at. Past it, sampling on a shared child works again (SDK servers never answer a cancelled request).
 */
const ABANDONED_GRACE_MS = 30_000;
/** Static bearer tokens shorter than this are refused: "a" or "" is not a credential. */
const MIN_TOKEN_CHARS = 16;
/** The consent passphrase, when given in clear (an scrypt hash has no minimum). */
const MIN_PASSPHRASE_CHARS = 12;
/** Secrets shorter than this are masked only where they stand alone, or a "1" would mask every digit. */
const MIN_SECRET_CHARS_ANYWHERE = 4;
/** A child that closed stdout has this long to exit on its own before it is treated as hung and stopped. */
const STDOUT_EOF_GRACE_MS = 200;
/** Longest key or id value remembered while scanning an oversized line for its top-level id. */
const ID_SCAN_MAX_CHARS = 256;
/** A per-server listTtlMs above a day is a typo, not a wish. */
const MAX_LIST_TTL_MS = 24 * 3_600_000;
/** Per-server idleTimeoutMs and startTimeoutMs: at most a day (a timer cannot wait longer than ~24.8 days). */
const MAX_SERVER_DURATION_MS = 24 * 3_600_000;
const MIN_IDLE_TIMEOUT_MS = 1_000;
const MIN_START_TIMEOUT_MS = 1_000;
const MIN_REQUEST_TIMEOUT_MS = 1_000;
/**
 * Idle timeout of a per-session server's sessions when its config names none: each holds a process (Claude.ai
 * rarely DELETEs its sessions; four Playwright sessions held 36 Chromium processes for the 30-minute default).
 */
const PER_SESSION_IDLE_MS = 5 * 60_000;
/**
 * Quiet time after the last event in a watched directory before the config is re-read: an editor's save, a
 * Kubernetes ConfigMap swap and a secret rotation are each a burst of events…
 */
const CONFIG_DEBOUNCE_MS = 250;
/** …but a stream of events (a file rewritten in a loop) holds a reload back no longer than this. */
const CONFIG_MAX_WAIT_MS = 2_000;
/** Directories watched for the config and its `${file:…}` secrets (each costs an inotify watch). */
const MAX_WATCHED_DIRS = 64;
/** Servers removed by reloads whose URL still answers "removed" (404) rather than a bare Not Found. */
const MAX_REMOVED_REMEMBERED = 64;
/** Credentials whose request buckets are kept per server (the least recently used go first: a full bucket). */
const MAX_RATE_BUCKETS = 10_000;
/** Per-server "rateLimit" bounds. */
const MAX_REQUESTS_PER_MINUTE = 1_000_000;
const MAX_REQUEST_BURST = 100_000;
/** A tool name longer than this is cut in the audit log (a client chooses it). */
const MAX_AUDIT_NAME_CHARS = 200;
/** Hex characters of a session id's SHA-256 that name the session in the audit log. */
const AUDIT_SESSION_DIGEST_CHARS = 16;
/** Tool names whose readOnlyHint is remembered per child under a "readOnly" policy (section 9). */
const MAX_TOOLS_TRACKED = 10_000;
/** Pages of the proxy's own tools/list followed to learn annotations (a cursor loop must end). */
const MAX_TOOL_LIST_PAGES = 100;
/** What `check` suggests for a per-session server left at PER_SESSION_IDLE_MS: a process per session, briefly. */
const SUGGESTED_PER_SESSION_IDLE_MS = 60_000;
/** --start-concurrency at most: each starting child may be an `npx -y` install; more at once is a typo. */
const MAX_START_CONCURRENCY = 64;
/** --tls-cert / --tls-key files: a Let's Encrypt fullchain.pem is about 6 KB, an RSA-4096 key about 3 KB. */
const MAX_PEM_FILE_BYTES = 256 * 1024;
/**
 * Quiet time after the last change in the certificate's or key's directory before the pair is re-read:
 * certbot swaps the live/ symlinks one at a time, and a read between two swaps sees a mismatched pair.
 */
const TLS_RELOAD_DEBOUNCE_MS = 500;
/** The search path execvp uses when the environment has no PATH (libuv's default; glibc's begins the same). */
const DEFAULT_EXEC_PATH = '/usr/bin:/bin';
/** The #! line `check` reads of a script command (Linux takes at most 255 bytes of it: binfmt_script). */
const SHEBANG_MAX_BYTES = 256;
/** A requestState we issue is ~250 characters; anything much longer is not one of ours. */
const MAX_REQUEST_STATE_CHARS = 1024;
/** Warning and error log lines kept per server for the status page (section 10): the last few say why it fails. */
const RECENT_PROBLEMS_PER_SERVER = 5;
/** Characters of one such line kept (an exit line quotes up to STDERR_REASON_LINES stderr lines). */
const RECENT_PROBLEM_CHARS = 600;
/** The status page reloads itself this often: a meta refresh, so no script and a strict CSP. */
const STATUS_REFRESH_S = 10;
/**
 * Upper bounds of the request latency histogram, in seconds: the Prometheus clients' defaults (5 ms … 10 s),
 * extended to 300 s, the time Claude.ai allows a tool call. One bucket array per server: bounded by the config.
 */
const LATENCY_BUCKETS_S: readonly number[] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];
/**
 * The `method` label of the request metrics (section 10): client→server requests of the spec's schema
 * (2025-11-25 ClientRequest, and 2026-07-28's server/discover and subscriptions/listen). Any other method is
 * counted as "other", so a client cannot grow the label set; the per-method counters are this long plus one.
 */
const MCP_METHODS: readonly string[] = [
  'initialize', 'ping', 'tools/list', 'tools/call', 'resources/list', 'resources/templates/list', 'resources/read',
  'resources/subscribe', 'resources/unsubscribe', 'prompts/list', 'prompts/get', 'completion/complete', 'logging/setLevel',
  'tasks/get', 'tasks/result', 'tasks/list', 'tasks/cancel', 'server/discover', 'subscriptions/listen',
];

/** Newest first. The child is initialized with the first; sessions may negotiate any of them (spec basic/lifecycle §Version Negotiation). */
export const SUPPORTED_PROTOCOL_VERSIONS: readonly string[] = Object.freeze([
  '2025-11-25',
  '2025-06-18',
  '2025-03-26',
  '2024-11-05',
]);
/** Assumed when a request carries no MCP-Protocol-Version and no session says otherwise (spec 2025-11-25 basic/transports §Protocol Version Header). */
const DEFAULT_NEGOTIATED_VERSION = '2025-03-26';
/** Only these protocol versions may send JSON-RPC batches (removed in 2025-06-18). */
const BATCH_VERSION = '2025-03-26';

/** Origins Claude.ai's requests carry (e.g. koala73/worldmonitor PR #2416; claude.com is its newer domain). */
const DEFAULT_ALLOWED_ORIGINS: readonly string[] = ['https://claude.ai', 'https://claude.com'];
const LOOPBACK_HOSTNAMES: ReadonlySet<string> = new Set(['localhost', '127.0.0.1', '[::1]', '::1']);

/**
 * Environment inherited by children, by allow-list: the SDK's DEFAULT_INHERITED_ENV_VARS, locale and tmp, and
 * what `npx`/`uvx` need to install behind a corporate proxy or a private CA (they fail without it).
 */
const INHERITED_ENV_VARS: readonly string[] = [
  'HOME', 'LOGNAME', 'PATH', 'SHELL', 'TERM', 'USER', 'LANG', 'LC_ALL', 'LC_CTYPE', 'TZ', 'TMPDIR',
  'NODE_EXTRA_CA_CERTS', 'SSL_CERT_FILE', 'SSL_CERT_DIR',
  'HTTP_PROXY', 'HTTPS_PROXY', 'NO_PROXY', 'http_proxy', 'https_proxy', 'no_proxy',
  'NPM_CONFIG_REGISTRY', 'NPM_CONFIG_CAFILE', 'NPM_CONFIG_CACHE', 'UV_CACHE_DIR', 'PIP_INDEX_URL', 'PIP_CERT',
];

// JSON-RPC error codes (JSON-RPC 2.0 §5.1). -32000…-32099 are ours to define: each failure has its own, so a
// client can tell a timeout from a cancellation from a session that ended. -32001 for an unknown session is
// what the SDK's servers send; -32002 is MCP's "resource not found"; -32800 is LSP's RequestCancelled.
const PARSE_ERROR = -32700;
const INVALID_REQUEST = -32600;
const METHOD_NOT_FOUND = -32601;
/** Also MCP's answer to an unknown tool (spec 2025-11-25 server/tools §Error Handling). */
const INVALID_PARAMS = -32602;
const INTERNAL_ERROR = -32603;
/** Generic: a server unavailable, a request refused by a limit. */
const SERVER_ERROR = -32000;
const SESSION_NOT_FOUND = -32001;
const REQUEST_TIMEOUT = -32003;
const SESSION_ENDED = -32004;
/** The child exited or was stopped with the request in flight. */
const SERVER_EXITED = -32005;
/** The child's answer was over maxLineBytes and was dropped. */
const MESSAGE_TOO_LARGE = -32006;
const REQUEST_CANCELLED = -32800;

// ── 2. Types ────────────────────────────────────────────────────────────────────────────────────────────

type JsonRpcId = string | number;
/** One JSON-RPC message as parsed from a client or a child; shape-checked by `jsonRpcKind` before use. */
type JsonRpcMessage = {
  jsonrpc: '2.0';
  id?: JsonRpcId | null;
  method?: string;
  params?: Record<string, unknown>;
  result?: unknown;
  error?: unknown;
};
type MessageKind = 'request' | 'notification' | 'response';
/** One serialised message on its way out: text, or byte pieces spliced from a child's line (see withId). */
type Outgoing = string | readonly Buffer[];

/** One configured stdio server, validated and with every `${…}` already expanded. */
export type ServerConfig = Readonly<{
  name: string;
  command: string;
  args: readonly string[];
  /** Configured environment only; the inherited allow-list is added at spawn. */
  env: Readonly<Record<string, string>>;
  /** Working directory of the child; undefined means the proxy's own. */
  cwd?: string;
  /** 'shared' (default): one child for all sessions. 'per-session': a child for each session. */
  sessions: 'shared' | 'per-session';
  /**
   * Directories the child may treat as its roots (absolute paths on the proxy's host). The proxy answers the
   * child's roots/list from these; clients' roots are paths on their own machines and never reach a child.
   * Undefined: the child is not told the client has roots.
   */
  roots?: readonly string[];
  /**
   * Client capabilities a shared child is initialized with: its sampling or elicitation requests can only be
   * routed when exactly one request is in flight, so they are opt-in. Per-session children get their own
   * session's. Undefined or empty: none.
   */
  clientCapabilities?: readonly ClientCapability[];
  /** Overrides limits.maxLineBytes for this server's stdout (a file server may answer with whole files). */
  maxLineBytes?: number;
  /** Overrides limits.listTtlMs: how long 2026-07-28 clients may cache this server's lists (0: do not cache). */
  listTtlMs?: number;
  /**
   * A session with no request and no open stream for this long ends (and, per session, its child stops).
   * Default: limits.sessionIdleMs for shared servers, PER_SESSION_IDLE_MS for per-session ones.
   */
  idleTimeoutMs?: number;
  /** Overrides limits.initTimeoutMs: how long this child may take to answer initialize (`npx -y` may build). */
  startTimeoutMs?: number;
  /** Overrides limits.requestTimeoutMs: how long a request may wait for this child's answer. */
  requestTimeoutMs?: number;
  /** Which of its tools clients see and may call (section 9); undefined: all. */
  tools?: ToolPolicy;
  /** Overrides limits.requestsPerMinute and limits.requestBurst for this server (section 9). */
  rateLimit?: Readonly<{ requestsPerMinute?: number; burst?: number }>;
  /** Values that came from the environment or a file through `${…}`; masked in every log line. */
  secrets: readonly string[];
  /** The files its `${file:…}` expansions read: a change to one reloads the config (section 10). */
  secretFiles?: readonly string[];
}>;

/**
 * Capabilities a shared child may be initialized with on its clients' behalf ("clientCapabilities"). `roots`
 * is opt-in only: a client's roots are paths on its own machine, so by default a child's roots come from the
 * config (or it has none), and a client's never reach it.
 */
type ClientCapability = 'sampling' | 'elicitation' | 'roots';
const CLIENT_CAPABILITIES: readonly ClientCapability[] = ['sampling', 'elicitation', 'roots'];
/** What a per-session child is initialized with from its own session's initialize (never its roots). */
const SESSION_CAPABILITIES: readonly ClientCapability[] = ['sampling', 'elicitation'];

/** The whole loaded config: immutable, so a reload can diff two of them by server name. */
export type Config = Readonly<{ servers: readonly ServerConfig[] }>;

export type LogLevel = 'error' | 'warn' | 'info' | 'debug';
const LOG_LEVELS: readonly LogLevel[] = ['error', 'warn', 'info', 'debug'];
export type LogFormat = 'text' | 'json';
const LOG_FORMATS: readonly LogFormat[] = ['text', 'json'];

/** Command-line options, after flags and MCP_PROXY_* variables are merged. */
export type Options = {
  configPath: string;
  host: string;
  port: number;
  /** Static bearer tokens; empty means no authentication. */
  tokens: string[];
  /** Operator's explicit consent to serve without auth on a non-loopback address. */
  allowUnauthenticated: boolean;
  /** Origins allowed besides the proxy's own, loopback ones and Claude's. */
  allowedOrigins: string[];
  /** Origins that get CORS headers; empty means CORS is off. */
  corsOrigins: string[];
  logLevel: LogLevel;
  logFormat: LogFormat;
  /** Directory whose node_modules holds packages baked into an image; `npx PKG` runs them directly. */
  packagesDir: string | undefined;
  /** The origin clients reach the proxy at (https://mcp.example.com); OAuth needs it. Never taken from Host. */
  publicUrl: string | undefined;
  /** Host routes: {name}.{baseDomain} serves server {name} at /mcp and /sse. */
  baseDomain: string | undefined;
  /** The operator's consent passphrase (or its scrypt hash); setting it turns the OAuth server on. */
  passphrase: string | undefined;
  /** Where OAuth clients and grants persist. */
  stateDir: string;
  /** A pre-registered OAuth client (id from --oauth-client-id, secret from the environment or a file). */
  oauthClient: { id: string; secret: string } | undefined;
  /** Hosts whose client ID metadata documents may be fetched (off when empty). */
  clientMetadataHosts: string[];
  /** Addresses or CIDR ranges of reverse proxies whose X-Forwarded-For names the client (rate limits). */
  trustProxy: string[];
  /**
   * Refuse a 2026-07-28 body sent with `MCP-Protocol-Version: 2025-11-25` (-32020). Off by default: Claude's
   * connector has been reported to send exactly that pair (github.com/anthropics/claude-code/issues/93290).
   */
  strictProtocolHeader: boolean;
  /** Reload when the config file or a `${file:…}` secret it reads changes (the CLI turns this on). */
  watchConfig: boolean;
  /** Append audit events to this file (section 9) instead of the log. */
  auditLog: string | undefined;
  /**
   * PEM certificate chain and private key files: both set, the proxy serves HTTPS and re-reads them when they
   * change (renewals); both undefined, plain HTTP (a reverse proxy terminates TLS). One alone is refused.
   */
  tlsCert: string | undefined;
  tlsKey: string | undefined;
  /** Overrides limits.startConcurrency (children initializing at once); undefined: the limit's default. */
  startConcurrency: number | undefined;
};

type ServerState = 'starting' | 'ready' | 'restarting' | 'errored' | 'stopped';

/** Why a session ends or a child is stopped: logged at info, and told to the requests it leaves unanswered. */
type StopReason = 'session ended' | 'idle' | 'evicted' | 'removed from the config' | 'its config changed' | 'shutdown';

type Logger = {
  error(scope: string, text: string): void;
  warn(scope: string, text: string): void;
  info(scope: string, text: string): void;
  debug(scope: string, text: string): void;
  enabled(level: LogLevel): boolean;
};

/** The proxy as a whole: options, limits, the server table and everything `close()` must tear down. */
type Proxy = {
  options: Options;
  limits: Limits;
  log: Logger;
  servers: Map<string, ServerRuntime>;
  http: http.Server;
  state: 'RUNNING' | 'CLOSING' | 'CLOSED';
  /** Every open SSE stream (legacy and Streamable), for keep-alives and shutdown. */
  streams: Set<SseStream>;
  timers: NodeJS.Timeout[];
  /** Children waiting for a start slot (limits.startConcurrency). */
  startQueue: Upstream[];
  starting: number;
  tokens: readonly Buffer[];
  /** The OAuth authorization server (section 9), or null when it is off. */
  oauth: OAuth | null;
  /** options.publicUrl, parsed once (ownOrigin runs on requests that carry an Origin). */
  publicUrl: URL | null;
  /** Reverse proxies whose X-Forwarded-For is believed (--trust-proxy), or null. */
  trustedProxies: BlockList | null;
  loopbackBind: boolean;
  /** Hostnames a Host header may name on a loopback bind: the loopback names and the bound address. */
  allowedHosts: ReadonlySet<string>;
  /** Open client sockets (limits.maxConnections), and those with bytes queued unread (maxQueuedBytesTotal). */
  connections: Set<Socket>;
  backlogged: Set<Socket>;
  maxConnections: number;
  /** Request-body bytes being read or parsed now (limits.maxBodyBytesInFlight). */
  bodyBytesInFlight: number;
  /** Batch answers held until their batch is complete (limits.maxBatchAnswerBytes, maxQueuedBytesTotal). */
  heldAnswerBytes: number;
  /**
   * Every child process group not yet known to be empty: null while its leader runs, then the reaping in
   * progress. Shutdown and the crash handler kill what is here.
   */
  groups: Map<number, Promise<void> | null>;
  /** 2026-07-28 calls answered input_required, waiting for their retry, by continuation id (section 8). */
  continuations: Map<string, ModernCall>;
  /** HMAC key of requestState, loaded from the state directory on first use. */
  stateKey: Buffer | null;
  /** Values masked in every log line: tokens, the passphrase, and the secrets of the config now and before the last reload. */
  secrets: readonly string[];
  /** The directories watched for config and secret-file changes (options.watchConfig), or null. */
  watcher: DirWatcher | null;
  /** URL segments of servers removed by a reload (MAX_REMOVED_REMEMBERED), so their clients are told why: 404. */
  removed: Set<string>;
  /** The audit log's file descriptor (--audit-log), or null: audit events go to the log (section 9). */
  auditFd: number | null;
  /** The name of the server the root route (/mcp, /sse) serves, or null (see rootServer). */
  rootName: string | null;
  /** Configs of servers a reload is stopping: their secrets stay masked until their children are gone. */
  retiring: Set<ServerConfig>;
  /** What the last reload from the file said (errors and warnings), so a watched one does not repeat it. */
  lastReload: string;
  /** The `${file:…}` paths of the config last refused, watched until a reload succeeds (bounded by the file). */
  refusedFiles: readonly string[];
  /** Where the proxy listens, as printed (http://127.0.0.1:8080). */
  url: string;
  /** Stops the certificate watchers and their pending reload (TLS only; null without TLS). */
  stopTlsWatch: (() => void) | null;
  closed: Promise<void> | null;
};

/** Watches directories for events naming one of `names`; `watch` replaces both sets (section 12). */
type DirWatcher = { watch(dirs: readonly string[], names: ReadonlySet<string>): void; close(): void };
/** Whose watcher it is: its log scope, its quiet time, and what an operator must do where it cannot watch. */
type DirWatchOptions = Readonly<{ scope: string; debounceMs: number; unseen: string }>;

/** A configured server and its running parts; the unit that can be added, stopped or restarted alone. */
type ServerRuntime = {
  proxy: Proxy;
  config: ServerConfig;
  /** Its URL segment (serverSegment of the name): the key of proxy.servers, /{segment}/mcp, {segment}.{baseDomain}. */
  segment: string;
  /** What is actually run: the config's command, or a baked package resolved from `npx PKG`. */
  launch: Launch;
  /** Session id → session, in least-recently-active order (re-inserted on activity). */
  sessions: Map<string, Session>;
  /** The shared child, or null in per-session mode. */
  shared: Upstream | null;
  /** Every live child of this server (the shared one, or one per session). */
  upstreams: Set<Upstream>;
  /** Children being stopped: still processes, so they count against twice the per-session caps. */
  windingDown: Set<Upstream>;
  /** Open sessions per credential (limits.maxSessionsPerCredential). */
  sessionsByCredential: Map<string, number>;
  /** Request token buckets per credential, least recently used first (MAX_RATE_BUCKETS; section 9). */
  buckets: Map<string, Bucket>;
  /** Counters for /metrics and the status page (section 10); they outlive child restarts, not the server's removal. */
  stats: ServerStats;
};

type Launch = Readonly<{ command: string; args: readonly string[] }>;

/** One stdio child and the routing state of everything in flight on it. */
type Upstream = {
  server: ServerRuntime;
  proc: ChildProcess | null;
  state: ServerState;
  startedAtMs: number;
  unstableRestarts: number;
  restarts: number;
  /** The child's InitializeResult; every session's initialize is answered from it. */
  initResult: Record<string, unknown> | null;
  protocolVersion: string;
  /** Child-side ids are this counter; progress tokens sent to the child reuse the request's child id. */
  nextId: number;
  pending: Map<number, Pending>;
  /** Requests the child sent to a client, by the child's id (for `notifications/cancelled`). */
  serverRequests: Map<JsonRpcId, { session: Session; proxyId: string }>;
  sessions: Set<Session>;
  /** resources/subscribe reference counts per URI, over every session on this child. */
  subscriptions: Map<string, number>;
  restartTimer: NodeJS.Timeout | null;
  initTimer: NodeJS.Timeout | null;
  /** Woken when the child becomes ready, errored or stopped. */
  waiters: (() => void)[];
  /** Per-session children: the session whose initialize decides the child's capabilities; null until then. */
  owner: Session | null;
  /** Whether this child holds one of the `startConcurrency` start slots. */
  holdsStartSlot: boolean;
  /** Resolves when the current process has exited. */
  exited: Promise<void>;
  /** Its last stderr lines (STDERR_REASON_LINES), masked: quoted when it exits and when it is given up. */
  recentStderr: string[];
  /**
   * Child ids of client requests given up on (cancelled, timed out, their session ended) that the child has
   * not answered yet (child id → when): it may still be working for them, so a child→client request could be
   * theirs. Each is forgotten when the child answers it late, or after ABANDONED_GRACE_MS (SDK servers never
   * answer a cancelled request). Bounded; past the bound, `abandonedOverflowUntilMs` stands for the rest.
   */
  abandoned: Map<number, number>;
  abandonedOverflowUntilMs: number;
  /** Lines waiting for the end-of-turn write to stdin (non-empty: the write is scheduled), and their size. */
  outQueue: string[];
  outBytes: number;
  /** The lane (section 8): child id of the request holding it, the requests waiting, and whether one is being let in. */
  laneHolder: number | null;
  laneQueue: LaneEntry[];
  laneGranting: boolean;
  /** 2026-07-28 subscriptions/listen streams on this child. */
  listeners: Set<Listener>;
  /** 2026-07-28 calls in flight per credential (limits.maxPendingPerSession: there is no session to count them). */
  modernInflight: Map<string, number>;
  /** A "readOnly" tool policy (section 9): each tool name seen in a tools/list answer → its readOnlyHint (MAX_TOOLS_TRACKED). */
  toolHints: Map<string, boolean>;
  /** Of this process's stdin.bytesWritten, what is already added to server.stats.stdinBytes (0 at each spawn). */
  stdinBytesCounted: number;
  /** Set once the child is being stopped for good (stopUpstream): the stop in progress. */
  stopping: Promise<void> | null;
};

/** A request in flight on a child: who asked, under which id, and where the answer goes. */
type Pending = {
  /** null for the proxy's own requests (initialize, re-subscribe after a restart). */
  session: Session | null;
  clientId: JsonRpcId;
  /** The client's `_meta.progressToken`, if it sent one; the child sees the child id instead. */
  clientToken: JsonRpcId | undefined;
  /** The Streamable HTTP POST waiting for this answer; null means the session's stream. */
  exchange: Exchange | null;
  method: string;
  /** URI of a resources/subscribe or unsubscribe, so the reference count follows the answer. */
  uri: string | undefined;
  sentAtMs: number;
  onAnswer: ((msg: JsonRpcMessage, line: string, raw: Buffer | null) => void) | null;
  /** tools/call only: the tool's name, for the audit log (section 9). */
  tool?: string;
};

/** One Streamable HTTP POST that carried requests, waiting for their answers. */
type Exchange = {
  proxy: Proxy;
  session: Session;
  /** Bytes of the batch answers held in `answers` until the last one comes (counted in proxy.heldAnswerBytes). */
  heldBytes: number;
  res: http.ServerResponse;
  /** true: answered as text/event-stream; false: one JSON body once every answer is in. */
  sse: SseStream | null;
  remaining: number;
  batch: boolean;
  answers: Outgoing[];
  done: boolean;
};

/** One open text/event-stream response with its own teardown. */
type SseStream = {
  res: http.ServerResponse;
  proxy: Proxy;
  closed: boolean;
  /** Runs once when the stream ends for any reason (client gone, overflow, shutdown). */
  onClose: (() => void) | null;
};

/** What a client declared in initialize: the capability objects a child→client request needs. */
type ClientCaps = Partial<Record<ClientCapability, Record<string, unknown>>>;

/**
 * One client session, Streamable HTTP or legacy SSE; or, for 'modern', one 2026-07-28 call (never in a table:
 * it lives as long as its request, so answers and progress route exactly as a session's do).
 */
type Session = {
  id: string;
  server: ServerRuntime;
  upstream: Upstream;
  transport: 'streamable' | 'sse' | 'modern';
  /** Who opened it: a digest of its token, or "anonymous" (limits.maxChildrenPerCredential). */
  credential: string;
  protocolVersion: string;
  caps: ClientCaps;
  /** Whether initialize was answered (per-session children start then, with these caps). */
  initialized: boolean;
  lastActiveMs: number;
  inflight: number;
  /** Legacy: the session's only stream. Streamable: the standalone GET stream, if open. */
  stream: SseStream | null;
  // The three collections below are made on first use: most sessions never subscribe, get a child→client
  // request or stream a POST, and three empty collections are half an idle session's heap (~490 bytes).
  subscriptions: Set<string> | null;
  /** Child→client requests delivered to this session: proxy id → the child's id. */
  serverRequests: Map<string, JsonRpcId> | null;
  /** Streamable POSTs of this session answered as event streams and still open. */
  exchanges: Set<Exchange> | null;
  closed: boolean;
  /** 'modern' only: the call this session stands for. */
  call?: ModernCall;
};

/** A 2026-07-28 request forwarded to a child (section 8), with what input_required needs to hold and resume it. */
type ModernCall = {
  up: Upstream;
  session: Session;
  credential: string;
  method: string;
  /** Of the params, when the call may be answered input_required (requestState binds it); else ''. */
  digest: string;
  /** The id of the HTTP request answered now (each retry has its own). */
  clientId: JsonRpcId;
  childId: number;
  /** The HTTP request waiting for this call; null while the client holds an input_required answer. */
  exchange: Exchange | null;
  /** The child's requests to the client not answered yet, by key (the child's id as a string). */
  asked: Map<string, { childId: JsonRpcId; method: string; params: Record<string, unknown> }> | null;
  askScheduled: boolean;
  round: number;
  /** Set once the call was answered input_required: its key in proxy.continuations. */
  continuation: string | null;
  expiry: NodeJS.Timeout | null;
  /** The child answered (or exited) while no HTTP request waited: kept for the retry, answered under its id. */
  lateAnswer: JsonRpcMessage | null;
  /** inputResponses a fresh call brought along (no requestState): asks under these keys are answered from them. */
  offered: Record<string, unknown> | null;
  finished: boolean;
};

/** A request waiting for its child's lane (section 8), legacy or 2026-07-28. */
type LaneEntry = {
  credential: string;
  /** A legacy request, for notifications/cancelled: its session, the client's id and where it is answered. */
  session: Session | null;
  clientId: JsonRpcId | null;
  exchange: Exchange | null;
  /** Nobody is left to answer (its client went away): the entry is dropped, not run… */
  gone: () => boolean;
  /** …and this undoes what queueing it counted. */
  drop: () => void;
  start: () => void;
};

/** A 2026-07-28 subscriptions/listen stream. */
type Listener = {
  up: Upstream;
  credential: string;
  /** The listen request's id: every message on the stream carries it as its subscriptionId. */
  id: JsonRpcId;
  /** The acknowledged notification kinds. */
  honoured: Record<string, unknown>;
  uris: Set<string>;
  stream: SseStream;
};

// ── 3. Small utilities ──────────────────────────────────────────────────────────────────────────────────

/** Proxy errors carry a stable code for machines and a message for people (ws createError style). */
export class ProxyError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
  }
}

/**
 * One line per event on stderr, at `level` and above. Text: `TIME LEVEL [scope] message`. JSON lines: `time`,
 * `level`, `component` and, when the scope is a server, `server`, then `msg` (for log collectors).
 */
export function createLogger(level: LogLevel, write: (line: string) => void = writeStderr, format: LogFormat = 'text'): Logger {
  const max = LOG_LEVELS.indexOf(level);
  const line = format === 'json' ? jsonLine : textLine;
  const at = (lvl: LogLevel) => (scope: string, text: string) => {
    if (LOG_LEVELS.indexOf(lvl) <= max) write(line(lvl, scope, text));
  };
  return {
    error: at('error'),
    warn: at('warn'),
    info: at('info'),
    debug: at('debug'),
    enabled: (lvl) => LOG_LEVELS.indexOf(lvl) <= max,
  };
}

function textLine(level: LogLevel, scope: string, text: string): string {
  return `${new Date().toISOString()} ${level.padEnd(5)} [${scope}] ${text}`;
}

function jsonLine(level: LogLevel, scope: string, text: string): string {
  const where = PROXY_COMPONENTS.has(scope) ? { component: scope } : { component: 'server', server: scope };
  return JSON.stringify({ time: new Date().toISOString(), level, ...where, msg: text });
}

/** Log scopes that name a part of the proxy; any other scope is a server's name. */
const PROXY_COMPONENTS: ReadonlySet<string> = new Set(['proxy', 'http', 'oauth', 'doctor', 'config', 'audit']);

function writeStderr(line: string): void {
  process.stderr.write(line + '\n');
}

/** A short, printable, single-line prefix of untrusted bytes, for logs. */
function headOf(text: string, maxChars = LOG_HEAD_BYTES): string {
  const head = text.length > maxChars ? text.slice(0, maxChars) + '…' : text;
  return JSON.stringify(head);
}

function typeName(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'array';
  return typeof value;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * Constant-time token check. Both sides are hashed first so lengths never leak through
 * timingSafeEqual's length requirement, and every token is compared (no early exit).
 */
export function tokenMatches(presented: string, tokens: readonly string[]): boolean {
  return tokenDigestMatches(sha256(presented), tokens.map(sha256));
}

function tokenDigestMatches(presented: Buffer, digests: readonly Buffer[]): boolean {
  return tokenDigestIndex(presented, digests) !== -1;
}

/** Which digest matches, comparing every one in constant time (no early exit), or -1. */
function tokenDigestIndex(presented: Buffer, digests: readonly Buffer[]): number {
  let found = -1;
  digests.forEach((digest, i) => {
    if (timingSafeEqual(presented, digest)) found = i;
  });
  return found;
}

function sha256(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}

function newSessionId(): string {
  return randomBytes(SESSION_ID_BYTES).toString('base64url');
}

/** Shell-style exit description (tini): 127 not found, 126 not executable, 128+n killed by signal n. */
function describeExit(code: number | null, signal: NodeJS.Signals | null): string {
  if (signal) return `killed by ${signal}`;
  if (code === 127) return 'exit 127 (command not found)';
  if (code === 126) return 'exit 126 (not executable)';
  return `exit ${code}`;
}

/**
 * Replaces every known secret in a text with ***: each line of a multi-line secret (a PEM file is logged line
 * by line), and the JSON-escaped form of each (a secret holding `"` or `\` appears so inside quoted JSON).
 * Longer needles go first, so a secret that contains another is masked whole.
 */
export function maskSecrets(text: string, secrets: readonly string[]): string {
  let out = text;
  for (const needle of needlesOf(secrets)) {
    if (!out.includes(needle)) continue;
    out = needle.length >= MIN_SECRET_CHARS_ANYWHERE ? out.split(needle).join('***') : maskStandalone(out, needle);
  }
  return out;
}

const NEEDLES = new WeakMap<readonly string[], readonly string[]>();

function needlesOf(secrets: readonly string[]): readonly string[] {
  let needles = NEEDLES.get(secrets);
  if (needles) return needles;
  const set = new Set<string>();
  for (const secret of secrets) {
    for (const line of secret.split(/\r?\n|\r/)) {
      if (line === '') continue;
      for (const form of encodedForms(line)) set.add(form);
    }
  }
  needles = [...set].sort((a, b) => b.length - a.length);
  NEEDLES.set(secrets, needles);
  return needles;
}

/**
 * The ways a value shows up in text a child or a client writes: as is; JSON-escaped (`"` and `\`), also with
 * every non-ASCII character as \uXXXX (Python's json.dumps default) in either hex case, each with or without
 * `\/` for a slash (PHP's json_encode); and URL-encoded, with %20 or + for a space.
 */
function encodedForms(value: string): string[] {
  const json = JSON.stringify(value).slice(1, -1);
  const ascii = json.replace(/[\u0080-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  const uri = encodeURIComponent(value);
  const upper = ascii.replace(/\\u[0-9a-f]{4}/g, (u) => `\\u${u.slice(2).toUpperCase()}`);
  const jsonForms = [json, ascii, upper].flatMap((form) => [form, form.replace(/\//g, '\\/')]);
  return [value, ...jsonForms, uri, uri.replace(/%20/g, '+')];
}

/** A short secret is masked only where no letter or digit touches it: "42" hides in "x=42", not in "1429". */
function maskStandalone(text: string, needle: string): string {
  const escaped = needle.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  return text.replace(new RegExp(`(?<![A-Za-z0-9])${escaped}(?![A-Za-z0-9])`, 'g'), '***');
}

/**
 * Control characters in logged text are escaped (\xNN, \uNNNN): a child's stderr or a client's header could
 * otherwise forge log lines with CR/LF, rewrite the terminal with ESC sequences, or reorder text with bidi marks.
 */
export function escapeControl(text: string): string {
  return UNSAFE_IN_LOGS.test(text) ? text.replace(UNSAFE_IN_LOGS_ALL, escapeOne) : text;
}

/** C0, DEL, C1, and the Unicode line separators and bidirectional controls (a U+202E reverses what follows). */
const UNSAFE_IN_LOGS = /[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/;
const UNSAFE_IN_LOGS_ALL = new RegExp(UNSAFE_IN_LOGS.source, 'g');

function escapeOne(c: string): string {
  const code = c.charCodeAt(0);
  return code <= 0xff ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`;
}

/**
 * The proxy's logger: every line, at every level and from every scope, is masked and escaped before the
 * configured logger sees it, so no call site can forget to (secrets come and go with servers: `secrets()`).
 */
function safeLogger(base: Logger, secrets: () => readonly string[]): Logger {
  const clean = (text: string) => escapeControl(maskSecrets(text, secrets()));
  return {
    error: (scope, text) => base.error(clean(scope), clean(text)),
    warn: (scope, text) => base.warn(clean(scope), clean(text)),
    info: (scope, text) => base.info(clean(scope), clean(text)),
    debug: (scope, text) => base.debug(clean(scope), clean(text)),
    enabled: (level) => base.enabled(level),
  };
}

/** For text put into HTML (the consent page, the status page): the five characters that can end a text or an attribute. */
function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** Reads a file of at most `maxBytes` (throws FILE_TOO_LARGE past it): a path to /dev/zero must not hang us. */
function readBounded(path: string, maxBytes: number): string {
  // Non-blocking open and a regular file only: opening a FIFO for reading blocks until a writer comes, and
  // that would stall every request (a reload reads the config and secret files while serving).
  const fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  try {
    if (!fstatSync(fd).isFile()) throw new ProxyError('NOT_A_FILE', 'not a regular file');
    const buf = Buffer.alloc(maxBytes + 1);
    let got = 0;
    for (let n = 1; n > 0 && got <= maxBytes; got += n) n = readSync(fd, buf, got, buf.length - got, null);
    if (got > maxBytes) throw new ProxyError('FILE_TOO_LARGE', `larger than ${maxBytes} bytes`);
    return buf.toString('utf8', 0, got);
  } finally {
    closeSync(fd);
  }
}

/**
 * Nesting depth of a JSON text, or more than `max`: counted by a scan that skips strings. Most messages have
 * fewer brackets in all than `max`, which a native indexOf count settles without the scan.
 */
export function jsonDepthExceeds(text: string, max: number): boolean {
  let brackets = 0;
  for (let i = text.indexOf('{'); i !== -1 && brackets <= max; i = text.indexOf('{', i + 1)) brackets++;
  for (let i = text.indexOf('['); i !== -1 && brackets <= max; i = text.indexOf('[', i + 1)) brackets++;
  if (brackets <= max) return false;
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 92 /* \\ */) i++;
      else if (c === 34 /* " */) inString = false;
    } else if (c === 34) inString = true;
    else if (c === 123 /* { */ || c === 91 /* [ */) {
      if (++depth > max) return true;
    } else if (c === 125 /* } */ || c === 93 /* ] */) depth--;
  }
  return false;
}

/** JSON with object keys sorted: equal values give equal text (config diffs, requestState digests). */
function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (!isObject(value)) return JSON.stringify(value) ?? 'null';
  return `{${Object.keys(value).sort().map((key) => `${JSON.stringify(key)}:${canonicalJson(value[key])}`).join(',')}}`;
}

// ── 4. Config: load, validate, diff ─────────────────────────────────────────────────────────────────────
//
// The file is claude_desktop_config.json as users already have it: {"mcpServers": {NAME: {command, args, env}}}.
// Unknown keys are ignored so a real file loads unchanged. Our extensions: "cwd" and "sessions".
// Validation collects every problem, one line each, naming the server, the field, what it got and what it
// expected; nothing is started unless the whole file is valid.

/** `defaulted` (with a config): each ${VAR:-default} whose VAR was unset or empty, by field, for `check`. */
type ConfigResult = {
  config: Config | null; errors: string[]; warnings: string[]; defaulted?: string[];
  /** Every `${file:…}` path the file names, read or not: a refused reload still watches them (section 12). */
  files?: string[];
};
type Env = Readonly<Record<string, string | undefined>>;
/** Reads a whole file as UTF-8, refusing more than `maxBytes` (default MAX_CONFIG_FILE_BYTES). */
type ReadFile = (path: string, maxBytes?: number) => string;

/** Remote entries (Claude Desktop can list them too); we only proxy stdio servers. */
const REMOTE_TYPES: ReadonlySet<string> = new Set(['sse', 'http', 'streamable-http']);
const EXPANSION_RE = /\$\{([^}]*)\}/g;
const ENV_NAME_RE = /^[A-Za-z_][A-Za-z0-9_]*$/;

export function loadConfigFile(path: string, env: Env = process.env, readFile: ReadFile = readUtf8): ConfigResult {
  let text: string;
  try {
    text = readFile(path);
  } catch (err) {
    return { config: null, errors: [`${path}: cannot read the config file (${readFailure(err)})`], warnings: [] };
  }
  return parseConfig(text, path, env, readFile);
}

function readUtf8(path: string, maxBytes = MAX_CONFIG_FILE_BYTES): string {
  return readBounded(path, maxBytes);
}

/** The reason a file could not be read, for an operator: an errno code, or the size limit it broke. */
function readFailure(err: unknown): string {
  if (err instanceof ProxyError) return err.message;
  return (err as NodeJS.ErrnoException).code ?? 'error';
}

export function parseConfig(text: string, source: string, env: Env = process.env, readFile: ReadFile = readUtf8): ConfigResult {
  const errors: string[] = [];
  const warnings: string[] = [];
  const root = parseJsonForConfig(text, source, errors);
  if (errors.length) return { config: null, errors, warnings };
  if (!isObject(root)) return fail(`${source}: top level: got ${typeName(root)}, expected an object`);
  const table = root.mcpServers;
  if (!isObject(table)) return fail(`${source}: mcpServers: got ${typeName(table)}, expected an object of servers`);
  const servers: ServerConfig[] = [];
  const defaulted: string[] = [];
  const files: string[] = [];
  for (const [name, entry] of Object.entries(table)) {
    const server = parseServer(name, entry, { source, env, readFile, errors, warnings, defaulted, files });
    if (server) servers.push(server);
  }
  for (const clash of segmentClashes(servers)) errors.push(`${source}: mcpServers ${clash}`);
  if (errors.length) return { config: null, errors, warnings, files };
  for (const { name } of servers) {
    if (PROXY_COMPONENTS.has(name)) warnings.push(`${source}: mcpServers.${name}: "${name}" is also the name of a part of the proxy in its log; with --log-format json its lines say component "${name}", not server "${name}" (rename it to tell them apart)`);
  }
  if (servers.length === 0) warnings.push(`${source}: no enabled stdio servers; nothing will be served`);
  return { config: Object.freeze({ servers: Object.freeze(servers) }), errors, warnings, defaulted, files };

  function fail(line: string): ConfigResult {
    return { config: null, errors: [line], warnings };
  }
}

/** JSON.parse, but the error names only a line and column: Node's message quotes the text, which may hold secrets. */
/**
 * The URL segment of a server name: lowercase, each run of characters other than letters, digits, '.', '_'
 * and '-' made one '-', no leading or trailing '.' or '-', at most MAX_SEGMENT_CHARS. "MCP SQLite Server" is
 * served at /mcp-sqlite-server/mcp. Incoming paths are matched lowercased, so /MyServer/mcp still works.
 */
export function serverSegment(name: string): string {
  const segment = name.toLowerCase().replace(/[^a-z0-9._-]+/g, '-').replace(/^[.-]+/, '');
  return segment.slice(0, MAX_SEGMENT_CHARS).replace(/[.-]+$/, '');
}

/** Two names that make the same URL segment, each pair named (only collisions are refused). */
function segmentClashes(servers: readonly Pick<ServerConfig, 'name'>[]): string[] {
  const seen = new Map<string, string>();
  const clashes: string[] = [];
  for (const { name } of servers) {
    const segment = serverSegment(name);
    const other = seen.get(segment);
    if (other !== undefined) clashes.push(`${JSON.stringify(other)} and ${JSON.stringify(name)} both make the URL segment "${segment}"; rename one`);
    else seen.set(segment, name);
  }
  return clashes;
}

function parseJsonForConfig(text: string, source: string, errors: string[]): unknown {
  try {
    return JSON.parse(text);
  } catch (err) {
    const at = /position (\d+)/.exec(String((err as Error).message));
    const where = at ? ` at ${lineColumn(text, Number(at[1]))}` : '';
    errors.push(`${source}: not valid JSON${where}`);
    return undefined;
  }
}

function lineColumn(text: string, offset: number): string {
  const before = text.slice(0, offset).split('\n');
  return `line ${before.length}, column ${before[before.length - 1].length + 1}`;
}

type ParseContext = {
  source: string; env: Env; readFile: ReadFile; errors: string[]; warnings: string[]; defaulted: string[];
  /** Every `${file:…}` path named, in order (each server's own are its secretFiles). */
  files: string[];
};

function parseServer(name: string, entry: unknown, ctx: ParseContext): ServerConfig | null {
  const at = `${ctx.source}: mcpServers.${/^[A-Za-z0-9._-]+$/.test(name) ? name : JSON.stringify(name)}`;
  const problem = (field: string, value: unknown, expected: string) =>
    ctx.errors.push(`${at}.${field}: got ${typeName(value)}, expected ${expected}`);
  if (name.length > MAX_SERVER_NAME_CHARS || !/[a-z0-9]/.test(serverSegment(name))) {
    ctx.errors.push(`${at}: invalid server name; it needs a letter or digit (its URL segment is made of them) and at most ${MAX_SERVER_NAME_CHARS} characters`);
    return null;
  }
  if (!isObject(entry)) return void problem('', entry, 'an object with "command"'), null;
  if (entry.disabled !== undefined && typeof entry.disabled !== 'boolean') problem('disabled', entry.disabled, 'a boolean');
  if (entry.disabled === true) return null;
  if (entry.url !== undefined || (typeof entry.type === 'string' && REMOTE_TYPES.has(entry.type))) {
    ctx.warnings.push(`${at}: skipped: a remote server (url/type) needs no proxy; only stdio servers are served`);
    return null;
  }
  if (entry.type !== undefined && entry.type !== 'stdio') problem('type', entry.type, '"stdio" or a remote type');
  const errorsBefore = ctx.errors.length;
  const secrets: string[] = [];
  const filesBefore = ctx.files.length;
  const expand = (value: string, field: string) => expandValue(value, { ...ctx, at: `${at}.${field}`, secrets });
  const command = typeof entry.command === 'string' && entry.command.trim() ? entry.command : undefined;
  if (!command) problem('command', entry.command, 'a non-empty string');
  const args = parseStringArray(entry.args, 'args', problem).map((arg, i) => expand(arg, `args[${i}]`));
  const env = parseEnv(entry.env, problem, expand);
  if (entry.cwd !== undefined && typeof entry.cwd !== 'string') problem('cwd', entry.cwd, 'a string (directory)');
  const cwd = typeof entry.cwd === 'string' ? expand(entry.cwd, 'cwd') : undefined;
  const sessions = entry.sessions ?? 'shared';
  if (sessions !== 'shared' && sessions !== 'per-session') problem('sessions', entry.sessions, '"shared" or "per-session"');
  const roots = parseRoots(entry.roots, problem);
  const clientCapabilities = parseClientCapabilities(entry.clientCapabilities, problem);
  if (roots && clientCapabilities?.includes('roots')) {
    ctx.errors.push(`${at}.clientCapabilities: "roots" asks the clients for their roots, and "roots" names this server's own: set one of them`);
  }
  const maxLineBytes = entry.maxLineBytes;
  if (maxLineBytes !== undefined && !(Number.isInteger(maxLineBytes) && (maxLineBytes as number) > 0 && (maxLineBytes as number) <= MAX_LINE_BYTES_CEILING)) {
    problem('maxLineBytes', maxLineBytes, `an integer from 1 to ${MAX_LINE_BYTES_CEILING}`);
  }
  const listTtlMs = durationField(entry, 'listTtlMs', 0, MAX_LIST_TTL_MS, problem);
  const idleTimeoutMs = durationField(entry, 'idleTimeoutMs', MIN_IDLE_TIMEOUT_MS, MAX_SERVER_DURATION_MS, problem);
  const startTimeoutMs = durationField(entry, 'startTimeoutMs', MIN_START_TIMEOUT_MS, MAX_SERVER_DURATION_MS, problem);
  const requestTimeoutMs = durationField(entry, 'requestTimeoutMs', MIN_REQUEST_TIMEOUT_MS, MAX_SERVER_DURATION_MS, problem);
  const tools = parseToolPolicy(entry.tools, problem, (field, text) => ctx.errors.push(`${at}.${field}: ${text}`));
  const rateLimit = parseRateLimit(entry.rateLimit, problem);
  // spawn() throws on a NUL in any of these; it can never start, so it is a config error, not a crash loop.
  const withNul = [['command', command ?? ''], ...args.map((arg, i) => [`args[${i}]`, arg]),
    ...Object.entries(env).map(([key, value]) => [`env.${key}`, value]), ['cwd', cwd ?? '']].find(([, v]) => v.includes('\0'));
  if (withNul) ctx.errors.push(`${at}.${withNul[0]}: contains a NUL character, which no command line can carry`);
  if (ctx.errors.length > errorsBefore || !command) return null;
  return Object.freeze({
    name, command, args: Object.freeze(args), env: Object.freeze(env), cwd,
    sessions: sessions as ServerConfig['sessions'], roots, clientCapabilities, maxLineBytes: maxLineBytes as number | undefined,
    listTtlMs, idleTimeoutMs, startTimeoutMs, requestTimeoutMs, tools, rateLimit, secrets: Object.freeze(secrets), secretFiles: Object.freeze(ctx.files.slice(filesBefore)),
  });
}

/** "roots": absolute paths on this host, the only roots a child is ever told about. */
/** An optional per-server duration in milliseconds, an integer within [min, max]. */
function durationField(
  entry: Record<string, unknown>, field: string, min: number, max: number, problem: (f: string, v: unknown, e: string) => void,
): number | undefined {
  const value = entry[field];
  if (value === undefined) return undefined;
  if (Number.isInteger(value) && (value as number) >= min && (value as number) <= max) return value as number;
  problem(field, value, `an integer from ${min} to ${max} (milliseconds)`);
  return undefined;
}

function parseRoots(value: unknown, problem: (f: string, v: unknown, e: string) => void): readonly string[] | undefined {
  if (value === undefined) return undefined;
  if (!Array.isArray(value)) return problem('roots', value, 'an array of absolute paths'), undefined;
  const roots: string[] = [];
  value.forEach((item, i) => {
    if (typeof item === 'string' && isAbsolute(item) && !item.includes('\0')) roots.push(item);
    else problem(`roots[${i}]`, item, 'an absolute path');
  });
  return Object.freeze(roots);
}

function parseClientCapabilities(value: unknown, problem: (f: string, v: unknown, e: string) => void): readonly ClientCapability[] | undefined {
  if (value === undefined) return undefined;
  const expected = `an array of ${CLIENT_CAPABILITIES.map((cap) => JSON.stringify(cap)).join(' and ')}`;
  if (!Array.isArray(value)) return problem('clientCapabilities', value, expected), undefined;
  const caps: ClientCapability[] = [];
  value.forEach((item, i) => {
    if (CLIENT_CAPABILITIES.includes(item)) caps.push(item);
    else problem(`clientCapabilities[${i}]`, typeof item === 'string' ? JSON.stringify(item) : item, expected.replace('an array of ', ''));
  });
  return Object.freeze(caps);
}

function parseStringArray(value: unknown, field: string, problem: (f: string, v: unknown, e: string) => void): string[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) return problem(field, value, 'an array of strings'), [];
  const out: string[] = [];
  value.forEach((item, i) => (typeof item === 'string' ? out.push(item) : problem(`${field}[${i}]`, item, 'a string')));
  return out;
}

function parseEnv(
  value: unknown,
  problem: (f: string, v: unknown, e: string) => void,
  expand: (v: string, field: string) => string,
): Record<string, string> {
  if (value === undefined) return {};
  if (!isObject(value)) return problem('env', value, 'an object of string values'), {};
  const out: Record<string, string> = {};
  for (const [key, item] of Object.entries(value)) {
    if (!ENV_NAME_RE.test(key)) problem(`env.${JSON.stringify(key)}`, key, 'a variable name [A-Za-z_][A-Za-z0-9_]*');
    else if (typeof item !== 'string') problem(`env.${key}`, item, 'a string');
    else out[key] = expand(item, `env.${key}`);
  }
  return out;
}

type Expansion = ParseContext & { at: string; secrets: string[] };

/**
 * Expands ${VAR}, ${VAR:-default} and ${file:/path} (Docker/Kubernetes secrets). An unset variable without
 * a default, or an unreadable file, is an error naming the field and the variable, never the value.
 */
function expandValue(value: string, ctx: Expansion): string {
  return value.replace(EXPANSION_RE, (_match, expr: string) => expandOne(expr, ctx) ?? '');
}

/** One expansion. Values from the environment or a file are recorded as secrets; defaults are the config's own. */
function expandOne(expr: string, ctx: Expansion): string | undefined {
  if (expr.startsWith('file:')) {
    const path = expr.slice('file:'.length);
    ctx.files.push(path); // watched even when unreadable now: the reload that follows its creation fixes the config
    try {
      const value = ctx.readFile(path, MAX_SECRET_FILE_BYTES).replace(/\r?\n$/, '');
      ctx.secrets.push(value);
      return value;
    } catch (err) {
      ctx.errors.push(`${ctx.at}: cannot read secret file ${JSON.stringify(path)} (${readFailure(err)})`);
      return undefined;
    }
  }
  const sep = expr.indexOf(':-');
  const name = sep === -1 ? expr : expr.slice(0, sep);
  if (!ENV_NAME_RE.test(name)) {
    ctx.errors.push(`${ctx.at}: invalid expansion \${${name}}; expected \${VAR}, \${VAR:-default} or \${file:/path}`);
    return undefined;
  }
  const fromEnv = ctx.env[name];
  if (sep !== -1 && !fromEnv) {
    ctx.defaulted.push(`${ctx.at}: \${${name}} is ${fromEnv === undefined ? 'not set' : 'empty'}, so the default written in the config is used`);
    return expr.slice(sep + 2);
  }
  if (fromEnv === undefined) {
    ctx.errors.push(`${ctx.at}: environment variable ${name} is not set (use \${${name}:-default} for a default)`);
    return undefined;
  }
  ctx.secrets.push(fromEnv);
  return fromEnv;
}

/**
 * What a reload changes, by server name: servers to start, to stop, to restart (`fields` names what differs,
 * never a value), to update in place (only settings read as they are used: listTtlMs, idleTimeoutMs,
 * startTimeoutMs, requestTimeoutMs, tools) and to leave alone with their children and sessions.
 */
export type ConfigDiff = {
  added: ServerConfig[];
  removed: ServerConfig[];
  changed: { config: ServerConfig; fields: string[] }[];
  updated: ServerConfig[];
  unchanged: ServerConfig[];
};

/** Fields a running child was started with: a change to one restarts the server. */
const LAUNCH_FIELDS = ['command', 'args', 'env', 'cwd', 'sessions', 'roots', 'clientCapabilities', 'maxLineBytes'] as const;
/** Fields read when they are used: a change to one is applied in place. */
const LIVE_FIELDS = ['listTtlMs', 'idleTimeoutMs', 'startTimeoutMs', 'requestTimeoutMs', 'tools', 'rateLimit'] as const;

/** Pure: compares two loaded configs (every `${…}` already expanded, so a rotated secret is an env change). */
export function diffConfigs(before: Config, after: Config): ConfigDiff {
  const old = new Map(before.servers.map((server) => [server.name, server]));
  const diff: ConfigDiff = { added: [], removed: [], changed: [], updated: [], unchanged: [] };
  for (const next of after.servers) {
    const prev = old.get(next.name);
    old.delete(next.name);
    if (!prev) {
      diff.added.push(next);
      continue;
    }
    const fields = LAUNCH_FIELDS.flatMap((field) => changedFields(field, prev[field], next[field]));
    if (fields.length) diff.changed.push({ config: next, fields });
    else if (LIVE_FIELDS.some((field) => changedFields(field, prev[field], next[field]).length)) diff.updated.push(next);
    else diff.unchanged.push(next);
  }
  diff.removed.push(...old.values());
  return diff;
}

/** The names of what differs: `env.KEY` for each changed variable (its value is a secret), else the field. */
function changedFields(field: string, a: unknown, b: unknown): string[] {
  if (field !== 'env') return canonicalJson(a ?? null) === canonicalJson(b ?? null) ? [] : [field];
  const x = a as Readonly<Record<string, string>>;
  const y = b as Readonly<Record<string, string>>;
  const keys = [...new Set([...Object.keys(x), ...Object.keys(y)])].sort();
  return keys.filter((key) => x[key] !== y[key]).map((key) => `env.${key}`);
}

/** Every directory that must be watched to see `paths` change (section 10). */
function watchedDirs(paths: readonly string[]): string[] {
  const dirs = new Set<string>();
  for (const path of paths) {
    // The directory, not the file: editors save by rename and Kubernetes swaps a ConfigMap's `..data` symlink,
    // and a watch on the old inode goes silent. The target's directory too, when the path is a symlink.
    dirs.add(dirname(resolvePath(path)));
    try {
      dirs.add(dirname(realpathSync(path)));
    } catch {
      // Missing for now (mid-swap, or a secret file yet to be written): its directory is watched already.
    }
  }
  return [...dirs];
}

// ── 5. Children: spawn, framing, restart, kill ──────────────────────────────────────────────────────────

type LineFramer = { push(chunk: Buffer): void; end(): void };
/** What the framer knows of a dropped line: its length, its first bytes, and its top-level numeric id if any. */
type OnOversize = (bytes: number, head: string, id: number | undefined) => void;
// (id is undefined for a line that carries a "method": a request or notification answers nothing of ours.)
const NEWLINE = 0x0a;
const CARRIAGE_RETURN = 0x0d;

/**
 * Splits a byte stream into lines in linear time: partial lines are kept as a list of pieces with a running
 * byte count and joined once (no Buffer.concat per chunk, unlike the SDK's ReadBuffer). A trailing \r is
 * stripped (spec: newline-delimited; Windows servers write \r\n). A line over `maxLineBytes` (terminator
 * not counted) is reported with its length and first bytes, dropped, and framing goes on with the next line.
 */
export function createLineFramer(
  maxLineBytes: number,
  onLine: (line: string, raw: Buffer) => void,
  onOversize: OnOversize,
  headBytes: number = LOG_HEAD_BYTES,
  scanIds = false,
): LineFramer {
  let pieces: Buffer[] = [];
  let size = 0;
  let dropping = false;
  let head = '';
  // While a line is dropped, its bytes still pass through the id scanner: the request it answers can then be
  // failed at once instead of waiting for the request timeout.
  let ids: IdScanner | null = null;
  // One extra byte of slack while accumulating: it may be the \r of a \r\n terminator.
  const hardCap = maxLineBytes + 1;

  function finish(last: Buffer, start: number, end: number): void {
    const total = size + (end - start);
    if (dropping || total > hardCap) return reportOversize(total, last, start, end);
    let raw = pieces.length === 0 ? last.subarray(start, end) : Buffer.concat([...pieces, last.subarray(start, end)]);
    pieces = [];
    size = 0;
    if (raw[raw.length - 1] === CARRIAGE_RETURN) raw = raw.subarray(0, raw.length - 1);
    if (raw.length > maxLineBytes) return reportOversize(total, raw, 0, raw.length);
    if (raw.length === 0) return;
    let text: string;
    try {
      text = raw.toString('utf8');
    } catch {
      return reportOversize(total, raw, 0, raw.length); // past V8's longest string: too large to be a message
    }
    onLine(text, raw);
  }

  function reportOversize(total: number, last: Buffer, start: number, end = last.length): void {
    const first = head || firstBytes([...pieces, last.subarray(start, end)], headBytes);
    let id: number | undefined;
    if (scanIds) {
      const scanner = ids ?? scanPieces(pieces);
      scanner.feed(last.subarray(start, end));
      id = scanner.hasMethod() ? undefined : scanner.id();
    }
    // Clear the state before reporting, so a throwing handler cannot leave the framer stuck (SDK ReadBuffer).
    pieces = [];
    size = 0;
    dropping = false;
    head = '';
    ids = null;
    onOversize(total, first, id);
  }

  function scanPieces(parts: readonly Buffer[]): IdScanner {
    const scanner = createIdScanner();
    for (const part of parts) scanner.feed(part);
    return scanner;
  }

  function keep(chunk: Buffer, start: number): void {
    if (start >= chunk.length) return;
    size += chunk.length - start;
    if (dropping) return void ids?.feed(start === 0 ? chunk : chunk.subarray(start));
    if (size > hardCap) {
      // Past the cap: remember only the first bytes for the report and stop storing (the limit stays tripped
      // until the line ends, as eventsource-parser's `terminated` does).
      head = firstBytes([...pieces, chunk.subarray(start)], headBytes);
      if (scanIds) {
        ids = scanPieces(pieces);
        ids.feed(chunk.subarray(start));
      }
      pieces = [];
      dropping = true;
      return;
    }
    pieces.push(start === 0 ? chunk : chunk.subarray(start));
  }

  return {
    push(chunk: Buffer): void {
      let start = 0;
      for (let nl = chunk.indexOf(NEWLINE, start); nl !== -1; nl = chunk.indexOf(NEWLINE, start)) {
        finish(chunk, start, nl);
        start = nl + 1;
      }
      keep(chunk, start);
    },
    end(): void {
      if (size > 0 || pieces.length > 0) finish(Buffer.alloc(0), 0, 0);
    },
  };
}

type IdScanner = { feed(bytes: Buffer): void; id(): number | undefined; idKeys(): number; hasMethod(): boolean };

/**
 * Reads the top-level "id" member of a JSON object fed to it in pieces, in one linear pass and constant memory
 * (keys and values are kept only up to ID_SCAN_MAX_CHARS), as JSON.parse would: a key written with escapes
 * ("\u0069d") is decoded before it is compared, and of repeated "id" members the last one counts. It tracks
 * only strings, escapes, depth and the current top-level key: enough for a line too large to parse. Bytes of
 * multi-byte UTF-8 characters are all >= 0x80, so they never look like the ASCII this matches on.
 */
export function createIdScanner(): IdScanner {
  let depth = 0;
  let inString = false;
  let escaped = false;
  let expectKey = false;
  let readingKey = false;
  let key = '';
  let keyIsId = false;
  let readingId = false;
  let value = '';
  let ids = 0;
  let method = false;
  let found: number | undefined;

  function endKey(): void {
    let decoded = key.length >= ID_SCAN_MAX_CHARS ? '' : key;
    if (decoded.includes('\\')) {
      try {
        decoded = JSON.parse(`"${decoded}"`);
      } catch {
        decoded = ''; // not a valid key: JSON.parse would refuse the whole line anyway
      }
    }
    keyIsId = decoded === 'id';
    if (decoded === 'method') method = true;
  }

  /** The id's value ended: an integer is one of ours; anything else (string, object, 1.5) is not. */
  function endId(integer: boolean): void {
    const number = Number(value);
    found = integer && value !== '' && /^[-+.eE0-9]+$/.test(value) && Number.isSafeInteger(number) ? number : undefined;
    readingId = false;
    value = '';
  }

  function feed(bytes: Buffer): void {
    for (let i = 0; i < bytes.length; i++) {
      const c = bytes[i];
      if (inString) {
        if (escaped) escaped = false;
        else if (c === 0x5c /* \ */) escaped = true;
        else if (c === 0x22 /* " */) {
          inString = false;
          if (readingKey) endKey();
          else if (readingId) endId(false);
          readingKey = false;
          continue;
        }
        if (readingKey && key.length < ID_SCAN_MAX_CHARS) key += String.fromCharCode(c);
        continue;
      }
      if (c === 0x22) {
        inString = true;
        readingKey = depth === 1 && expectKey;
        key = '';
      } else if (c === 0x7b /* { */ || c === 0x5b /* [ */) {
        if (depth === 1 && readingId) endId(false);
        depth++;
        if (depth === 1) expectKey = c === 0x7b;
      } else if (c === 0x7d /* } */ || c === 0x5d /* ] */) {
        if (depth === 1 && readingId) endId(true);
        depth--;
      } else if (depth !== 1) continue;
      else if (c === 0x3a /* : */) {
        expectKey = false;
        if (keyIsId) {
          ids++;
          readingId = true;
          value = '';
        }
        keyIsId = false;
      } else if (c === 0x2c /* , */) {
        if (readingId) endId(true);
        expectKey = true;
      } else if (readingId && c !== 0x20 && c !== 0x09 && c !== 0x0d && c !== 0x0a && value.length < ID_SCAN_MAX_CHARS) {
        value += String.fromCharCode(c);
      }
    }
  }

  return {
    feed,
    id: () => {
      if (readingId) endId(true);
      return found;
    },
    idKeys: () => ids,
    hasMethod: () => method,
  };
}

/**
 * Whether a child's line has exactly one top-level "id" member, so replacing it yields the message the child
 * meant. A cheap test settles nearly every line: no second `"id"` anywhere and no escaped i or d (\u006…).
 * Only lines that fail it are scanned.
 */
function hasOneIdMember(line: string, raw: Buffer | null): boolean {
  const first = line.indexOf('"id"');
  // \u0069 and \u0064 (escaped i and d) both start with \u006.
  if ((first === -1 || line.indexOf('"id"', first + 4) === -1) && !line.includes('\\u006')) return true;
  const scanner = createIdScanner();
  scanner.feed(raw ?? Buffer.from(line));
  return scanner.idKeys() === 1;
}

/** The first `n` bytes of a list of pieces, as text, without joining more than that. */
function firstBytes(pieces: readonly Buffer[], n: number): string {
  const out: Buffer[] = [];
  let got = 0;
  for (const piece of pieces) {
    if (got >= n) break;
    const part = piece.subarray(0, n - got);
    out.push(part);
    got += part.length;
  }
  return Buffer.concat(out, got).toString('utf8');
}

export type RestartDecision =
  | { giveUp: false; delayMs: number; unstableRestarts: number }
  | { giveUp: true; unstableRestarts: number };

/**
 * Restart policy as a pure function (runit's rule, pm2's min_uptime). A child that ran at least
 * `stableUptimeMs` resets the count and restarts after the minimum delay; otherwise the delay doubles per
 * unstable restart up to the maximum, and after `maxUnstableRestarts` the server is given up as errored.
 */
export function nextRestart(unstableRestarts: number, uptimeMs: number, limits: Limits = DEFAULT_LIMITS): RestartDecision {
  if (uptimeMs >= limits.stableUptimeMs) return { giveUp: false, delayMs: limits.restartMinDelayMs, unstableRestarts: 0 };
  const count = unstableRestarts + 1;
  if (count > limits.maxUnstableRestarts) return { giveUp: true, unstableRestarts: count };
  const delayMs = Math.min(limits.restartMinDelayMs * 2 ** (count - 1), limits.restartMaxDelayMs);
  return { giveUp: false, delayMs, unstableRestarts: count };
}

/** The child's environment: an allow-list of ours (SDK DEFAULT_INHERITED_ENV_VARS) plus the configured env. */
function childEnv(config: Pick<ServerConfig, 'env'>, inherited: Env = process.env): Record<string, string> {
  const env: Record<string, string> = {};
  for (const key of INHERITED_ENV_VARS) {
    const value = inherited[key];
    // Skip exported bash functions ("() { …"), as the SDK does: they are code, not configuration.
    if (value !== undefined && !value.startsWith('()')) env[key] = value;
  }
  return Object.assign(env, config.env);
}

/** npx flags that change nothing about which package runs. */
const NPX_QUIET_FLAGS: ReadonlySet<string> = new Set(['-y', '--yes', '-q', '--quiet']);
/** An npm package name, scoped or not; nothing that could climb out of node_modules. */
const NPM_NAME_RE = /^(@[a-z0-9][a-z0-9._~-]*\/)?[a-z0-9][a-z0-9._~-]*$/i;

/**
 * `npx [-y] PKG[@version] args…` → `node DIR/node_modules/PKG/<bin> args…` when PKG is baked into `packagesDir`
 * (the distroless image has neither npx nor network). Null when it does not apply: the command runs as written.
 * The version in the spec is not checked: the image pins what was baked at build time.
 */
export function resolveBakedPackage(config: Pick<ServerConfig, 'command' | 'args'>, packagesDir: string | undefined, readFile: ReadFile = readUtf8): Launch | null {
  const npx = packagesDir ? npxPackage(config) : null;
  if (!packagesDir || !npx) return null;
  const { name, i } = npx;
  const dir = resolvePath(packagesDir, 'node_modules', name);
  let manifest: unknown;
  try {
    manifest = JSON.parse(readFile(join(dir, 'package.json')));
  } catch {
    return null; // not baked (or unreadable): run the command as written
  }
  const bin = binOf(manifest, name);
  if (!bin) return null;
  const file = resolvePath(dir, bin);
  if (!file.startsWith(dir + sep)) return null;
  return { command: process.execPath, args: [file, ...config.args.slice(i + 1)] };
}

/** The package `npx [-y] PKG[@version] …` runs (its name, and the index of PKG in args), or null. */
function npxPackage(config: Pick<ServerConfig, 'command' | 'args'>): { name: string; i: number } | null {
  if (basename(config.command) !== 'npx') return null;
  let i = 0;
  while (i < config.args.length && NPX_QUIET_FLAGS.has(config.args[i])) i++;
  const spec = config.args[i];
  if (spec === undefined) return null;
  const at = spec.indexOf('@', 1);
  const name = at === -1 ? spec : spec.slice(0, at);
  return NPM_NAME_RE.test(name) ? { name, i } : null;
}

/** The package's bin: a string, the entry named like the unscoped package, or the only entry. */
function binOf(manifest: unknown, name: string): string | undefined {
  if (!isObject(manifest)) return undefined;
  const bin = manifest.bin;
  if (typeof bin === 'string') return bin;
  if (!isObject(bin)) return undefined;
  const named = bin[name.slice(name.indexOf('/') + 1)];
  if (typeof named === 'string') return named;
  const entries = Object.values(bin);
  return entries.length === 1 && typeof entries[0] === 'string' ? entries[0] : undefined;
}

function newUpstream(server: ServerRuntime): Upstream {
  return {
    server, proc: null, state: 'starting', startedAtMs: 0, unstableRestarts: 0, restarts: 0,
    initResult: null, protocolVersion: SUPPORTED_PROTOCOL_VERSIONS[0], nextId: 1,
    pending: new Map(), serverRequests: new Map(), sessions: new Set(), subscriptions: new Map(),
    restartTimer: null, initTimer: null, waiters: [], owner: null, abandoned: new Map(), abandonedOverflowUntilMs: 0, holdsStartSlot: false, exited: Promise.resolve(), recentStderr: [],
    outQueue: [], outBytes: 0, laneHolder: null, laneQueue: [], laneGranting: false, listeners: new Set(), modernInflight: new Map(), toolHints: new Map(),
    stdinBytesCounted: 0, stopping: null,
  };
}

/** Children start through a queue so at most `startConcurrency` are installing/initializing at once. */
function requestStart(up: Upstream): void {
  const proxy = up.server.proxy;
  if (proxy.state !== 'RUNNING' || up.state === 'stopped' || retired(up.server)) return;
  if (proxy.starting >= proxy.limits.startConcurrency) {
    proxy.startQueue.push(up);
    return;
  }
  proxy.starting++;
  up.holdsStartSlot = true;
  spawnChild(up);
}

function releaseStartSlot(up: Upstream): void {
  if (!up.holdsStartSlot) return;
  up.holdsStartSlot = false;
  const proxy = up.server.proxy;
  proxy.starting--;
  const next = proxy.startQueue.shift();
  if (next) requestStart(next);
}

function spawnChild(up: Upstream): void {
  const { config, proxy } = up.server;
  const launch = up.server.launch;
  // Counted from here, so a spawn that fails at once is an unstable run and goes through backoff to errored.
  up.startedAtMs = Date.now();
  up.recentStderr = [];
  let proc: ChildProcess;
  try {
    // argv, never a shell string (tree-kill CVE-2019-15599); detached makes the child lead its own process
    // group (setsid), so the whole group can be signalled. Descendants that call setsid themselves escape.
    proc = spawn(launch.command, launch.args as string[], {
      shell: false, detached: true, stdio: ['pipe', 'pipe', 'pipe'], env: childEnv(config), cwd: config.cwd, windowsHide: true,
    });
  } catch (err) {
    // Synchronous failures (EMFILE, an invalid argument). Node's message may quote the environment: code only.
    return onSpawnFailure(up, null, err as NodeJS.ErrnoException);
  }
  up.proc = proc;
  up.stdinBytesCounted = 0;
  if (proc.pid !== undefined) {
    proxy.groups.set(proc.pid, null);
    up.server.stats.childrenStarted++;
  }
  up.exited = new Promise<void>((resolve) => {
    let gone = false;
    const onGone = (code: number | null, signal: NodeJS.Signals | null, why?: string) => {
      if (gone) return;
      gone = true;
      resolve();
      guarded(proxy, config.name, 'a child exit', () => onChildExit(up, proc, why ?? describeExit(code, signal), shellExitCode(code, signal)));
    };
    proc.once('exit', (code, signal) => onGone(code, signal));
    proc.once('error', (err: NodeJS.ErrnoException) => {
      // 'exit' never comes for a spawn failure (no pid); for a later error (a failed kill) it still will.
      if (proc.pid !== undefined) return proxy.log.debug(config.name, `child process error: ${err.code ?? 'unknown'}`);
      proxy.log.error(config.name, `cannot start ${JSON.stringify(config.command)}: ${err.code ?? 'spawn error'}`);
      onGone(null, null, `spawn failed (${err.code ?? 'error'})`);
    });
  });
  // A failed spawn may come without pipes (EMFILE): its 'error' event above ends this run.
  if (proc.pid === undefined || !proc.stdin || !proc.stdout || !proc.stderr) return;
  attachChildStreams(up, proc);
  proxy.log.info(config.name, `started pid ${proc.pid} (${basename(launch.command)}); initializing`);
  sendInitialize(up);
}

function onSpawnFailure(up: Upstream, proc: ChildProcess | null, err: NodeJS.ErrnoException): void {
  const { config, proxy } = up.server;
  const code = err.code ?? 'error';
  proxy.log.error(config.name, `cannot start ${JSON.stringify(config.command)}: ${code}`);
  onChildExit(up, proc, `spawn failed (${code})`);
}

/** Runs an event handler so that a bug in it costs one event, never the process (logged with the event). */
function guarded(proxy: Proxy, scope: string, what: string, handler: () => void): void {
  try {
    handler();
  } catch (err) {
    proxy.log.error(scope, `internal error while handling ${what}; dropped it: ${describeError(err)}`);
  }
}

/** An unexpected error for the log: its name, message and first frame, never the data it was handling. */
function describeError(err: unknown): string {
  if (!(err instanceof Error)) return typeName(err);
  const frame = err.stack?.split('\n').find((line) => line.trim().startsWith('at '))?.trim() ?? '';
  return `${err.name}: ${headOf(err.message)} ${frame}`;
}

function attachChildStreams(up: Upstream, proc: ChildProcess): void {
  const { config, proxy } = up.server;
  const maxLineBytes = config.maxLineBytes ?? proxy.limits.maxLineBytes;
  const { maxStderrLineBytes } = proxy.limits;
  // Heads of oversized lines are taken a secret's length longer than shown, masked, then cut: a secret that
  // straddles the cut is masked whole instead of leaking its first bytes.
  const slack = Math.max(0, ...config.secrets.map((secret) => Buffer.byteLength(secret)));
  const stdout = createLineFramer(
    maxLineBytes,
    (line, raw) => guarded(proxy, config.name, 'a stdout line', () => handleChildLine(up, line, raw)),
    (bytes, head, id) => guarded(proxy, config.name, 'an oversized stdout line', () => onOversizedLine(up, bytes, head, id, maxLineBytes)),
    LOG_HEAD_BYTES + slack,
    true,
  );
  // A stderr line over the limit is logged cut to the limit, not dropped: it is the child's own log.
  const stderr = createLineFramer(
    maxStderrLineBytes,
    (line) => childStderrLine(up, line),
    (bytes, head) => childStderrLine(up, `${maskSecrets(head, config.secrets).slice(0, maxStderrLineBytes)}… (${bytes} bytes, truncated)`),
    maxStderrLineBytes + slack,
  );
  const stats = up.server.stats;
  proc.stdout!.on('data', (chunk: Buffer) => {
    stats.stdoutBytes += chunk.length;
    stdout.push(chunk);
  });
  proc.stdout!.on('end', () => {
    stdout.end();
    onStdoutEnd(up, proc);
  });
  proc.stderr!.on('data', (chunk: Buffer) => stderr.push(chunk));
  proc.stderr!.on('end', () => stderr.end());
  // EPIPE when the child dies with writes queued: the 'exit' handler already fails what was in flight.
  proc.stdin!.on('error', (err: NodeJS.ErrnoException) => proxy.log.debug(config.name, `stdin: ${err.code ?? 'error'}`));
}

/**
 * A child's stdout ended. Normally it is exiting; one that closed stdout and stays alive can never answer
 * again, yet would look ready while every request hangs. Past a short grace it is treated as ended: what is
 * in flight fails now, its group is stopped, and its exit brings the restart policy.
 */
function onStdoutEnd(up: Upstream, proc: ChildProcess): void {
  void exitsWithin(up.exited, STDOUT_EOF_GRACE_MS).then((exited) => {
    if (exited || up.proc !== proc || up.state === 'stopped') return;
    const { proxy, config } = up.server;
    proxy.log.warn(config.name, `closed its stdout but is still running (pid ${proc.pid}); stopping it`);
    if (up.state === 'ready') up.state = 'restarting';
    failPending(up, 'MCP server closed its output');
    void reapGroup(proxy, proc.pid!);
  });
}

/**
 * A stdout line over the limit was dropped. If it answered one of our requests, that request fails now with
 * an error naming the limit (the client would otherwise wait for requestTimeoutMs).
 */
function onOversizedLine(up: Upstream, bytes: number, head: string, id: number | undefined, limit: number): void {
  const { config, proxy } = up.server;
  proxy.log.warn(config.name, `skipped a stdout line of ${bytes} bytes over the ${limit}-byte limit (maxLineBytes), starting ${headOf(maskSecrets(head, config.secrets))}`);
  failAnswer(up, id, MESSAGE_TOO_LARGE, `MCP server's answer was larger than the ${limit}-byte limit (maxLineBytes)`);
}

/** The child's answer to request `id` cannot be delivered: whoever waits for it gets this error instead. */
function failAnswer(up: Upstream, id: number | undefined, code: number, message: string): void {
  const pending = id === undefined ? undefined : up.pending.get(id);
  if (!pending) return;
  settlePending(up, id!);
  countAnswer(up.server, pending, `error ${code}`);
  if (pending.onAnswer) return pending.onAnswer({ jsonrpc: '2.0', id: id!, error: { code, message } }, '', null);
  answerPending(pending, errorText(pending.clientId, code, message));
}

/** stderr is the child's log, not an error channel (spec basic/transports §stdio): prefixed, bounded, masked. */
function childStderrLine(up: Upstream, line: string): void {
  const { config, proxy } = up.server;
  const masked = maskSecrets(line, config.secrets);
  // npm's pointer to its own log file says nothing of why the server failed.
  if (!NPM_LOG_POINTER_RE.test(line)) {
    up.recentStderr.push(masked);
    if (up.recentStderr.length > STDERR_REASON_LINES) up.recentStderr.shift();
  }
  proxy.log.info(config.name, `stderr: ${masked}`);
}

/**
 * Writes one message line to the child. To an idle child (nothing else in flight, nothing queued) it goes out
 * at once: the child starts on it while we answer HTTP. Otherwise it joins a queue written in one piece when
 * the event-loop turn ends: a pipe write costs tens of µs here and wakes the child, so under load one write
 * per turn saves both processes a syscall and a wake-up per message (measured in bench/). Messages are
 * written in the order they came. False when the child is gone or its queue is full.
 */
function writeToChild(up: Upstream, text: string): boolean {
  const stdin = up.proc?.stdin;
  if (!stdin || !stdin.writable) return false;
  // Backpressure: Node queues writes after write() returns false; we bound that queue (plus ours) instead of
  // waiting per message, so one slow child refuses new work rather than growing without limit.
  if (stdin.writableLength + up.outBytes > up.server.proxy.limits.maxChildQueueBytes) return false;
  if (up.outQueue.length === 0) {
    // The request being written is already in `pending`: more than it means the child is busy.
    if (up.pending.size <= 1) return stdin.write(text + '\n'), true;
    setImmediate(flushToChild, up);
  }
  up.outQueue.push(text);
  up.outBytes += text.length + 1;
  return true;
}

function flushToChild(up: Upstream): void {
  const lines = up.outQueue;
  up.outQueue = [];
  up.outBytes = 0;
  const stdin = up.proc?.stdin;
  if (lines.length === 0 || !stdin || !stdin.writable) return;
  stdin.write(lines.length === 1 ? lines[0] + '\n' : lines.join('\n') + '\n');
}

/** A request of the proxy's own (initialize, re-subscribe, unsubscribe): no session waits for its answer. */
function sendOwnRequest(up: Upstream, method: string, params: Record<string, unknown>, onAnswer: Pending['onAnswer'] = null): void {
  const id = up.nextId++;
  up.pending.set(id, {
    session: null, clientId: id, clientToken: undefined, exchange: null, method, uri: undefined, sentAtMs: Date.now(), onAnswer,
  });
  // Not written (the child's input queue is full): nothing will answer it, so nothing waits for it.
  if (!writeToChild(up, JSON.stringify({ jsonrpc: '2.0', id, method, params }))) up.pending.delete(id);
}

/** Tells the child to stop working on a request nobody will read the answer of. */
function cancelOnChild(up: Upstream, childId: number, reason: string): void {
  writeToChild(up, JSON.stringify({ jsonrpc: '2.0', method: 'notifications/cancelled', params: { requestId: childId, reason } }));
}

/** The proxy's own initialize, declaring only what the proxy can honour for this child (childCapabilities). */
function sendInitialize(up: Upstream): void {
  up.initTimer = setTimeout(onInitializeTimeout, startTimeoutOf(up.server), up);
  up.initTimer.unref();
  sendOwnRequest(up, 'initialize', {
    protocolVersion: SUPPORTED_PROTOCOL_VERSIONS[0],
    capabilities: childCapabilities(up),
    clientInfo: { name: PROXY_NAME, version: PROXY_VERSION },
  }, (msg) => onInitializeAnswer(up, msg));
}

/**
 * Client capabilities declared to a child. `roots` only when the operator configured roots (the proxy answers
 * roots/list itself). A shared child gets the sampling/elicitation the operator enabled; a per-session child
 * gets exactly what its own session declared, so its requests can only ever go to that session. A client's
 * capability changes what a server offers (server-everything lists its sampling tool only then), so nothing is
 * declared by default: a client without them sees what a direct connection shows.
 */
function childCapabilities(up: Upstream): Record<string, unknown> {
  const config = up.server.config;
  const caps: Record<string, unknown> = {};
  if (config.roots) caps.roots = { listChanged: false };
  if (up.owner) {
    for (const cap of SESSION_CAPABILITIES) if (up.owner.caps[cap]) caps[cap] = up.owner.caps[cap];
  } else {
    for (const cap of config.clientCapabilities ?? []) caps[cap] = {};
  }
  return caps;
}

function startTimeoutOf(server: ServerRuntime): number {
  return server.config.startTimeoutMs ?? server.proxy.limits.initTimeoutMs;
}

/** How long a session of this server may idle (see ServerConfig.idleTimeoutMs). */
function idleTimeoutOf(server: ServerRuntime): number {
  return server.config.idleTimeoutMs ?? (server.config.sessions === 'per-session' ? Math.min(PER_SESSION_IDLE_MS, server.proxy.limits.sessionIdleMs) : server.proxy.limits.sessionIdleMs);
}

function onInitializeTimeout(up: Upstream): void {
  const { proxy, config } = up.server;
  const listing = [...up.pending.values()].some((pending) => !pending.session && pending.method === 'tools/list');
  const what = listing ? 'list its tools (the "readOnly" tool policy needs their annotations)' : 'answer initialize';
  proxy.log.error(config.name, `did not ${what} within ${startTimeoutOf(up.server)} ms; stopping it`);
  up.initTimer = null;
  signalGroup(up.proc, 'SIGKILL');
}

function onInitializeAnswer(up: Upstream, msg: JsonRpcMessage): void {
  const { proxy, config } = up.server;
  // Stopped while it was starting: its answer must not revive it (it would be restarted and owned by nothing).
  if (up.state === 'stopped') return;
  const result = msg.result;
  if (!isObject(result) || typeof result.protocolVersion !== 'string') {
    const why = msg.error ? headOf(maskSecrets(JSON.stringify(msg.error), config.secrets)) : 'no valid result';
    proxy.log.error(config.name, `initialize failed: ${why}; stopping it`);
    signalGroup(up.proc, 'SIGKILL');
    return;
  }
  up.initResult = result;
  up.protocolVersion = result.protocolVersion;
  writeToChild(up, '{"jsonrpc":"2.0","method":"notifications/initialized"}');
  resubscribe(up);
  // A readOnly tool policy judges calls by the tools' annotations: they are known before the first call can come
  // (still within the start timeout).
  if (config.tools?.readOnly) refreshToolHints(up, () => becomeReady(up));
  else becomeReady(up);
}

function becomeReady(up: Upstream): void {
  const { proxy, config } = up.server;
  if (up.state !== 'starting' && up.state !== 'restarting') return; // stopped or timed out meanwhile
  if (up.initTimer) clearTimeout(up.initTimer);
  up.initTimer = null;
  up.state = 'ready';
  releaseStartSlot(up);
  notifySettled(up);
  proxy.log.info(config.name, `ready (pid ${up.proc?.pid}, protocol ${up.protocolVersion}) after ${Date.now() - up.startedAtMs} ms`);
}

/** After a restart the new child knows nothing of our sessions' subscriptions: subscribe again. */
function resubscribe(up: Upstream): void {
  for (const uri of up.subscriptions.keys()) sendOwnRequest(up, 'resources/subscribe', { uri });
}

function notifySettled(up: Upstream): void {
  const waiters = up.waiters;
  up.waiters = [];
  for (const wake of waiters) wake();
}

/** Resolves when the child is ready, errored or stopped (never rejects). */
function whenSettled(up: Upstream): Promise<void> {
  if (up.state === 'ready' || up.state === 'errored' || up.state === 'stopped') return Promise.resolve();
  return new Promise((resolve) => up.waiters.push(resolve));
}

/**
 * A child exited: everything in flight on it is answered with an error at once (no client waits for a
 * timeout), strays left in its process group are signalled, and the restart policy decides what is next.
 */
function onChildExit(up: Upstream, proc: ChildProcess | null, exit: string, exitCode: number | null = null): void {
  if (proc && up.proc !== proc) return;
  const { proxy, config } = up.server;
  const uptimeMs = Date.now() - up.startedAtMs;
  countStdinBytes(up);
  up.proc = null;
  up.abandoned.clear(); // the next process starts with nothing running
  up.abandonedOverflowUntilMs = 0;
  if (up.initTimer) clearTimeout(up.initTimer);
  up.initTimer = null;
  // Strays left in its group (grandchildren) are stopped too, by the clock, until the group is empty.
  if (proc?.pid) void reapGroup(proxy, proc.pid);
  releaseStartSlot(up);
  failPending(up, up.state === 'stopped' ? 'MCP server stopped' : 'MCP server process exited');
  if (up.state === 'stopped') return;
  recordExit(up.server.stats, exit, exitCode);
  const stderr = up.recentStderr.length ? `; its last stderr: ${up.recentStderr.join(' | ')}` : '';
  const decision = nextRestart(up.unstableRestarts, uptimeMs, proxy.limits);
  up.unstableRestarts = decision.unstableRestarts;
  if (decision.giveUp) {
    up.state = 'errored';
    notifySettled(up);
    endListeners(up);
    proxy.log.error(config.name, `${exit} after ${uptimeMs} ms; gave up after ${proxy.limits.maxUnstableRestarts} fast restarts, server errored${stderr}`);
    return;
  }
  up.state = 'restarting';
  up.restarts++;
  up.server.stats.restarts++;
  proxy.log.warn(config.name, `${exit} after ${uptimeMs} ms; restarting in ${decision.delayMs} ms${stderr}`);
  up.restartTimer = setTimeout(restartChild, decision.delayMs, up);
  up.restartTimer.unref();
}

function restartChild(up: Upstream): void {
  up.restartTimer = null;
  requestStart(up);
}

/** Signals a child's whole process group; ESRCH (already gone) is the expected end state, not an error. */
function signalGroup(proc: ChildProcess | null, signal: NodeJS.Signals): void {
  if (proc?.pid) signalPgid(proc.pid, signal);
}

function signalPgid(pgid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pgid, signal);
  } catch (err) {
    // ESRCH: the group is already empty. EPERM: the id now names someone else's group; it is not ours to signal.
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'ESRCH' && code !== 'EPERM') throw err;
  }
}

/**
 * Empties a process group by the clock: SIGTERM, then SIGKILL every killGraceMs until nothing is left. The
 * group is on proxy.groups meanwhile, so shutdown and the crash handler kill it too. The group id
 * cannot be handed to a new process while any member lives, and the poll stops as soon as none does.
 */
function reapGroup(proxy: Proxy, pgid: number): Promise<void> {
  const reaping = proxy.groups.get(pgid);
  if (reaping) return reaping;
  const done = (async () => {
    const grace = proxy.limits.killGraceMs;
    signalPgid(pgid, 'SIGTERM');
    while (!(await waitUntil(() => !groupAlive(pgid), grace))) signalPgid(pgid, 'SIGKILL');
    proxy.groups.delete(pgid);
  })();
  proxy.groups.set(pgid, done);
  return done;
}

/** Last resort when the proxy itself dies: SIGKILL every child group it knows, synchronously. */
export function killAllChildGroups(): void {
  for (const proxy of LIVE_PROXIES) for (const pgid of proxy.groups.keys()) signalPgid(pgid, 'SIGKILL');
}

function groupAlive(pid: number): boolean {
  try {
    process.kill(-pid, 0);
    return true;
  } catch {
    return false; // ESRCH: no process left in the group (EPERM cannot happen for our own children).
  }
}

/**
 * Stops a child in steps (spec lifecycle §Shutdown, SDK client close()): close stdin, wait, SIGTERM the group,
 * wait, SIGKILL the group. Then strays left in the group (grandchildren) are killed too.
 */
function stopUpstream(up: Upstream, why: StopReason): Promise<void> {
  // Once: a per-session child is stopped by its session's end and again by its server's removal.
  up.stopping ??= stopInSteps(up, why);
  return up.stopping;
}

async function stopInSteps(up: Upstream, why: StopReason): Promise<void> {
  up.state = 'stopped';
  up.server.upstreams.delete(up); // no longer counts against maxChildrenPerServer while it winds down…
  if (up.proc) up.server.windingDown.add(up); // …but against twice that
  if (up.restartTimer) clearTimeout(up.restartTimer);
  up.restartTimer = null;
  const proxy = up.server.proxy;
  proxy.startQueue = proxy.startQueue.filter((queued) => queued !== up);
  notifySettled(up);
  const proc = up.proc;
  const grace = proxy.limits.killGraceMs;
  if (proc?.pid) {
    // What the turn queued (cancellations and refusals from endSession) goes out before end of input.
    flushToChild(up);
    proc.stdin?.end();
    if (!(await exitsWithin(up.exited, grace))) {
      signalGroup(proc, 'SIGTERM');
      if (!(await exitsWithin(up.exited, grace))) {
        signalGroup(proc, 'SIGKILL');
        await exitsWithin(up.exited, grace);
      }
    }
    await reapGroup(proxy, proc.pid);
    proxy.log.info(up.server.config.name, `pid ${proc.pid} stopped (${why === 'idle' ? `session idle for ${idleTimeoutOf(up.server)} ms` : why})`);
  }
  releaseStartSlot(up);
  failPending(up, ENDED_MESSAGES[why] ?? 'MCP server stopped');
  up.server.windingDown.delete(up);
}

function exitsWithin(exited: Promise<void>, ms: number): Promise<boolean> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms, false);
    exited.then(() => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

/** Bounded poll (tini's busy_wait): for states that raise no event, such as a process group emptying. */
async function waitUntil(cond: () => boolean, timeoutMs: number, stepMs = POLL_STEP_MS): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() >= deadline) return false;
    await new Promise((resolve) => setTimeout(resolve, stepMs));
  }
  return true;
}

// ── 6. Sessions and id routing ──────────────────────────────────────────────────────────────────────────
//
// Many client sessions share one child. Every client request gets a fresh id on the child (a counter) and a
// Pending entry that remembers the session, its own id and where the answer goes; a progress token sent to
// the child is the request's child id, so one map serves both. The routing of what the child sends:
//
//   child sends                              goes to
//   response / error                         the session that asked (its POST, or its SSE stream)
//   notifications/progress                   the session whose request carries that token
//   notifications/cancelled                  the session the cancelled child→client request went to
//   notifications/resources/updated          every session subscribed to that URI
//   notifications/*/list_changed, message…   every session on the child
//   sampling/…, elicitation/…, other requests  per-session child: its session, if it declared the capability.
//                                            Shared child: the session of the one client request in flight,
//                                            if it declared it and the operator enabled it; else an error
//   roots/list                               answered by the proxy from the server's configured "roots"
//   ping                                     answered by the proxy
//
// Clients' roots never reach a child: they are paths on the client's machine, and a server such as
// server-filesystem makes them its sandbox (a client answering file:/// opened / to every session).

/** Picks the version a session speaks (spec lifecycle §Version Negotiation): echo it if we support it. */
export function negotiateVersion(requested: unknown, childVersion: string): string {
  if (typeof requested === 'string' && SUPPORTED_PROTOCOL_VERSIONS.includes(requested)) return requested;
  return SUPPORTED_PROTOCOL_VERSIONS.includes(childVersion) ? childVersion : SUPPORTED_PROTOCOL_VERSIONS[0];
}

/** Classifies a parsed value as a JSON-RPC 2.0 message, or null if it is not one. */
function jsonRpcKind(msg: unknown): MessageKind | null {
  if (!isObject(msg) || msg.jsonrpc !== '2.0') return null;
  if (msg.params !== undefined && !isObject(msg.params) && !Array.isArray(msg.params)) return null;
  const hasId = typeof msg.id === 'string' || (typeof msg.id === 'number' && Number.isFinite(msg.id));
  if (typeof msg.method === 'string') {
    if (hasId) return 'request';
    return msg.id === undefined ? 'notification' : null;
  }
  if (msg.method !== undefined) return null;
  if ((hasId || msg.id === null) && ('result' in msg) !== ('error' in msg)) return 'response';
  return null;
}

function errorText(id: JsonRpcId | null, code: number, message: string): string {
  return JSON.stringify({ jsonrpc: '2.0', id, error: { code, message } });
}

function resultText(id: JsonRpcId, result: unknown): string {
  return JSON.stringify({ jsonrpc: '2.0', id, result });
}

/**
 * Serialises `msg` with its id replaced. When the child's line has the id where serialisers put it (first
 * after "jsonrpc", or last), the line is spliced instead of re-serialised: a 100 KB result is not copied
 * through JSON.stringify again. The splice is exact: the parsed id must equal the text replaced. A large
 * line is spliced as bytes: the child's own buffer goes to the socket, never re-encoded from a string.
 */
function withId(line: string, raw: Buffer | null, msg: JsonRpcMessage, id: JsonRpcId): Outgoing {
  if (typeof msg.id === 'number') {
    const oldId = String(msg.id);
    const bytes = raw && raw.length >= RAW_PASSTHROUGH_MIN_BYTES ? raw : null;
    const prefix = `{"jsonrpc":"2.0","id":${oldId},`;
    // A repeated "id" member would survive the splice, and a parser that takes the last one would read the
    // child's id instead of the client's: such lines are re-serialised (JSON.parse kept only one).
    if (!hasOneIdMember(line, raw)) return JSON.stringify({ ...msg, id });
    if (line.startsWith(prefix)) {
      const head = `{"jsonrpc":"2.0","id":${JSON.stringify(id)},`;
      return bytes ? [Buffer.from(head), bytes.subarray(prefix.length)] : head + line.slice(prefix.length);
    }
    const suffix = `"id":${oldId}}`;
    const before = line.charCodeAt(line.length - suffix.length - 1);
    if (line.endsWith(suffix) && (before === 44 /* , */ || before === 123 /* { */)) {
      const tail = `"id":${JSON.stringify(id)}}`;
      // The suffix is ASCII, so its length in bytes equals its length in characters.
      return bytes ? [bytes.subarray(0, bytes.length - suffix.length), Buffer.from(tail)] : line.slice(0, line.length - suffix.length) + tail;
    }
  }
  return JSON.stringify({ ...msg, id });
}

// Session table ───────

/**
 * Creates a session, evicting the least recently active idle one at the cap. Null when nothing can give way.
 * In per-session mode the session gets its own child, started when its initialize says what it can do.
 */
function createSession(server: ServerRuntime, transport: Session['transport'], credential: string): Session | null {
  if (retired(server)) return null; // see handleMcpPost: a reload took it out of the table
  const limits = server.proxy.limits;
  const mine = server.sessionsByCredential.get(credential) ?? 0;
  if (credential !== ANONYMOUS && mine >= limits.maxSessionsPerCredential && !evictIdleSession(server, credential)) return null;
  if (server.sessions.size >= limits.maxSessionsPerServer && !evictIdleSession(server)) return null;
  let upstream = server.shared;
  if (!upstream) {
    // One credential cannot hold every child (16 open /sse streams would otherwise keep them all for good):
    // at its share, or at the server's cap, its least recently active session without work gives way.
    // A child given way still runs until it has stopped (up to three kill-grace steps): processes are bounded
    // at twice the caps, so churning sessions cannot pile up children that ignore their stop. Checked first,
    // so a newcomer that would be refused anyway ends nobody's session.
    const held = childrenHeldBy(server, credential);
    if (server.upstreams.size + server.windingDown.size >= 2 * limits.maxChildrenPerServer) return null;
    if (held + windingDownOf(server, credential) >= 2 * limits.maxChildrenPerCredential) return null;
    if (held >= limits.maxChildrenPerCredential && !evictForChild(server, credential)) return null;
    if (server.upstreams.size >= limits.maxChildrenPerServer && !evictForChild(server, null)) return null;
    upstream = newUpstream(server);
    server.upstreams.add(upstream);
  }
  const session: Session = {
    id: newSessionId(), server, upstream, transport, credential, protocolVersion: DEFAULT_NEGOTIATED_VERSION,
    caps: {}, initialized: false, lastActiveMs: Date.now(), inflight: 0,
    stream: null, subscriptions: null, serverRequests: null, exchanges: null, closed: false,
  };
  if (!server.shared) upstream.owner = session;
  server.sessions.set(session.id, session);
  upstream.sessions.add(session);
  server.sessionsByCredential.set(credential, (server.sessionsByCredential.get(credential) ?? 0) + 1);
  auditSession(session, 'session_open');
  return session;
}

function windingDownOf(server: ServerRuntime, credential: string): number {
  let count = 0;
  for (const up of server.windingDown) if (up.owner?.credential === credential) count++;
  return count;
}

function childrenHeldBy(server: ServerRuntime, credential: string): number {
  let held = 0;
  for (const session of server.sessions.values()) if (session.credential === credential) held++;
  return held;
}

/**
 * Per-session mode at a cap: the least recently active session (of `credential`, or of anyone) with nothing
 * in flight ends, open stream or not, so its child can be reused for a newcomer.
 */
function evictForChild(server: ServerRuntime, credential: string | null): boolean {
  for (const session of server.sessions.values()) {
    if (session.inflight > 0 || session.exchanges?.size || (credential !== null && session.credential !== credential)) continue;
    server.proxy.log.info(server.config.name, 'per-session children at their cap; ended the least recently active session to make room');
    endSession(session, 'evicted');
    return true;
  }
  return false;
}

/** No stream and no request; and not a per-session session whose initialize waits for its child to start. */
function isIdle(session: Session): boolean {
  if (session.stream !== null || session.exchanges?.size || session.inflight !== 0) return false;
  return session.upstream.owner !== session || session.upstream.state !== 'starting';
}

/** The map is kept in activity order, so the first idle session is the least recently active one. */
function evictIdleSession(server: ServerRuntime, credential: string | null = null): boolean {
  for (const session of server.sessions.values()) {
    if (!isIdle(session) || (credential !== null && session.credential !== credential)) continue;
    server.proxy.log.debug(server.config.name, 'session cap reached; evicted the least recently active idle session');
    endSession(session, 'evicted');
    return true;
  }
  return false;
}

/** Marks activity; re-inserting keeps the map in least-recently-active order for eviction and the sweep. */
function touchSession(session: Session): void {
  session.lastActiveMs = Date.now();
  const sessions = session.server.sessions;
  sessions.delete(session.id);
  sessions.set(session.id, session);
}

/** What a request in flight hears when its session ends: why, when the client should do something about it. */
const ENDED_MESSAGES: Readonly<Partial<Record<StopReason, string>>> = {
  'removed from the config': 'Session ended: this server was removed from the proxy config',
  'its config changed': 'Session ended: this server restarted with a new config; reconnect',
};

/** Ends a session: its streams close, its subscriptions are released, child→client requests are refused. */
function endSession(session: Session, why: StopReason = 'session ended'): void {
  if (session.closed) return;
  session.closed = true;
  auditSession(session, 'session_close', why);
  const { server, upstream } = session;
  server.sessions.delete(session.id);
  const left = (server.sessionsByCredential.get(session.credential) ?? 1) - 1;
  if (left > 0) server.sessionsByCredential.set(session.credential, left);
  else server.sessionsByCredential.delete(session.credential);
  upstream.sessions.delete(session);
  for (const uri of session.subscriptions ?? []) releaseSubscription(upstream, uri);
  session.subscriptions = null;
  abandonRequests(session, ENDED_MESSAGES[why] ?? 'Session ended');
  // The child is waiting on this session for roots/sampling/elicitation answers that will never come.
  for (const childId of session.serverRequests?.values() ?? []) {
    upstream.serverRequests.delete(childId);
    writeToChild(upstream, errorText(childId, INTERNAL_ERROR, 'Client session ended'));
  }
  session.serverRequests = null;
  for (const exchange of session.exchanges ?? []) closeStream(exchange.sse!);
  if (session.stream) closeStream(session.stream);
  if (!server.shared) void stopUpstream(upstream, why);
}

/**
 * The session's requests still in flight are cancelled on the child (it should not work for nobody, and the
 * pending entries must not outlive the session, or ending sessions would get around maxPendingPerSession),
 * and a POST still waiting for an answer gets an error instead of hanging.
 */
function abandonRequests(session: Session, message: string): void {
  const up = session.upstream;
  if (session.inflight === 0) return;
  for (const [childId, pending] of up.pending) {
    if (pending.session === session) abortPending(up, childId, pending, 'session ended', SESSION_ENDED, message);
  }
}

/** Gives up on a request in flight: the child is told to stop working on it, and whoever waits gets an error. */
function abortPending(up: Upstream, childId: number, pending: Pending, reason: string, code: number, message: string): void {
  abandonPending(up, childId, pending);
  countAnswer(up.server, pending, reason);
  cancelOnChild(up, childId, reason);
  answerPending(pending, errorText(pending.clientId, code, message));
  if (pending.session?.call) endCall(pending.session.call);
}

/**
 * A client request given up on (cancelled, timed out, its client gone) may still be running on the child,
 * which may still ask its client something: it is remembered (Upstream.abandoned), and asks are refused while
 * it may be (see stillAbandoned). Its lane goes to the next request at once: tool calls go on, only asks wait
 * out the doubt. The proxy's own requests ask nobody anything and are not remembered.
 */
function abandonPending(up: Upstream, childId: number, pending: Pending): void {
  settlePending(up, childId);
  if (pending.session) noteAbandoned(up, childId);
}

/** Whether a request given up on may still be running: the ones past ABANDONED_GRACE_MS are forgotten. */
function stillAbandoned(up: Upstream): boolean {
  const now = Date.now();
  for (const [childId, atMs] of up.abandoned) if (now - atMs >= ABANDONED_GRACE_MS) up.abandoned.delete(childId);
  return up.abandoned.size > 0;
}

/** …or more were given up on than are tracked, within the last ABANDONED_GRACE_MS. */
function maybeAbandoned(up: Upstream): boolean {
  return stillAbandoned(up) || Date.now() < up.abandonedOverflowUntilMs;
}

const ABANDONED_REFUSAL = (method: string) =>
  `a request given up on (cancelled, timed out or of an ended session) may still be running on this shared server, so the request's session is not certain; set "sessions": "per-session" for this server to use ${method}`;

/** Remembers a request given up on while the child may still work on it (see Upstream.abandoned). */
function noteAbandoned(up: Upstream, childId: number): void {
  if (up.abandoned.size >= MAX_ABANDONED_TRACKED) stillAbandoned(up); // forget those past their grace first
  if (up.abandoned.size < MAX_ABANDONED_TRACKED) up.abandoned.set(childId, Date.now());
  // Past the bound, the doubt lasts a grace period from the last one given up on (not until a restart).
  else up.abandonedOverflowUntilMs = Date.now() + ABANDONED_GRACE_MS;
}

/** What the client declared that a child→client request needs (its `roots` only where the operator opted in). */
function capsOf(declared: unknown): ClientCaps {
  const caps: ClientCaps = {};
  if (!isObject(declared)) return caps;
  for (const cap of CLIENT_CAPABILITIES) if (isObject(declared[cap])) caps[cap] = declared[cap];
  return caps;
}

/**
 * A session's initialize: records what it declared and, in per-session mode, starts its own child with those
 * capabilities (once). The answer comes from the child's InitializeResult when it is ready (initializeResult).
 */
function beginInitialize(session: Session, msg: JsonRpcMessage): void {
  const up = session.upstream;
  if (session.initialized) return;
  session.initialized = true;
  session.caps = capsOf(msg.params?.capabilities);
  if (up.owner === session && up.state === 'starting' && !up.proc && !up.holdsStartSlot) requestStart(up);
}

/** The session's initialize, answered from the child's cached InitializeResult with the session's version. */
function initializeResult(session: Session, msg: JsonRpcMessage): string {
  const up = session.upstream;
  session.protocolVersion = negotiateVersion(msg.params?.protocolVersion, up.protocolVersion);
  return resultText(msg.id as JsonRpcId, { ...up.initResult, protocolVersion: session.protocolVersion });
}

// Client → child ───────

/**
 * Handles one message from a client session. Answers that the proxy gives itself (ping, errors, subscribe
 * reference counts) go through `answer`, exactly as a child's answer would.
 */
function forwardFromClient(session: Session, msg: JsonRpcMessage, kind: MessageKind, exchange: Exchange | null): void {
  if (kind === 'request') return forwardRequest(session, msg, exchange);
  if (kind === 'response') return forwardClientResponse(session, msg);
  return forwardNotification(session, msg);
}

function forwardRequest(session: Session, msg: JsonRpcMessage, exchange: Exchange | null): void {
  const up = session.upstream;
  const id = msg.id as JsonRpcId;
  const reply = (text: string) => answer(session, exchange, text);
  // ping is about the link to us (spec: answer promptly); the child's liveness is supervision's business.
  if (msg.method === 'ping') return reply(resultText(id, {}));
  if (msg.method === 'initialize') return reply(errorText(id, INVALID_REQUEST, 'Session is already initialized'));
  if (retired(session.server)) return reply(errorText(id, SESSION_ENDED, RETIRED_MESSAGE.replace('Not Found: ', 'Session ended: ')));
  if (up.state !== 'ready') return reply(errorText(id, SERVER_ERROR, `MCP server is ${up.state}; try again later`));
  if (toolBlocked(up, msg)) {
    auditBlocked(session.server, session.credential, session.transport, msg);
    return reply(errorText(id, INVALID_PARAMS, TOOL_BLOCKED));
  }
  if (mayAsk(up, msg.method!)) {
    const entry = enterLane(up, {
      credential: session.credential, session, clientId: id, exchange, start: () => forwardQueued(session, msg, exchange),
      gone: () => !!exchange?.done || (session.closed && !exchange), drop: () => void session.inflight--,
    });
    if (entry === 'full') return reply(errorText(id, SERVER_ERROR, 'Too many requests waiting for this server; retry later'));
    if (entry === 'queued') return void session.inflight++; // counted while it waits: the session is not idle
  }
  // maxPendingPerSession was checked for the whole POST before any of it got here (overPendingLimit).
  const uri = typeof msg.params?.uri === 'string' ? msg.params.uri : undefined;
  if (msg.method === 'resources/subscribe' && uri !== undefined) {
    const refused = subscriptionRefusal(session, uri);
    if (refused) return reply(errorText(id, SERVER_ERROR, refused));
    if (!takeSubscription(session, uri)) return reply(resultText(id, {}));
  }
  if (msg.method === 'resources/unsubscribe' && uri !== undefined && !dropSubscription(session, uri)) return reply(resultText(id, {}));
  if (sendRequest(session, msg, exchange, uri, null) === null) reply(errorText(id, SERVER_ERROR, NOT_ACCEPTING_INPUT));
}

const NOT_ACCEPTING_INPUT = 'MCP server is not accepting input; try again later';

/**
 * Sends a client request to the session's child under a fresh id, with a Pending entry that routes its
 * answer and progress back (and takes the lane if the request may ask). Returns the child id, or null when
 * the child's input is full (nothing is left pending). Shared by sessions and 2026-07-28 calls.
 */
function sendRequest(session: Session, msg: JsonRpcMessage, exchange: Exchange | null, uri: string | undefined, onAnswer: Pending['onAnswer']): number | null {
  const up = session.upstream;
  // One counter per child, never reset (it survives restarts), so a child id is never reused while an answer
  // to it could still arrive. Clients all count from 0 (SDK), so their ids collide; ours cannot.
  const childId = up.nextId++;
  const meta = msg.params?._meta;
  // The spec requires progress tokens unique across active requests; the child id already is, and reusing it
  // lets one map (pending) resolve both answers and progress.
  const clientToken = isObject(meta) && (typeof meta.progressToken === 'string' || typeof meta.progressToken === 'number')
    ? meta.progressToken : undefined;
  const pending: Pending = {
    session, clientId: msg.id as JsonRpcId, clientToken, exchange, method: msg.method!, uri, sentAtMs: Date.now(), onAnswer,
  };
  if (msg.method === 'tools/call') pending.tool = auditName(msg.params?.name);
  up.pending.set(childId, pending);
  session.inflight++;
  if (mayAsk(up, msg.method!)) up.laneHolder = childId;
  // Rewrite in place: the parsed message is ours and is not used again after this.
  msg.id = childId;
  if (clientToken !== undefined) (meta as Record<string, unknown>).progressToken = childId;
  if (writeToChild(up, JSON.stringify(msg))) {
    countRequest(up.server, msg.method!);
    return childId;
  }
  settlePending(up, childId);
  return null;
}

/** A legacy request let into the lane (its client is still there): unless its session ended meanwhile. */
function forwardQueued(session: Session, msg: JsonRpcMessage, exchange: Exchange | null): void {
  session.inflight--;
  if (session.closed) return answer(session, exchange, errorText(msg.id as JsonRpcId, SESSION_ENDED, 'Session ended'));
  forwardRequest(session, msg, exchange);
}

/** A client answering a child→client request: the proxy's id is swapped back for the child's. */
function forwardClientResponse(session: Session, msg: JsonRpcMessage): void {
  const proxyId = String(msg.id);
  const childId = session.serverRequests?.get(proxyId);
  if (childId === undefined) {
    session.server.proxy.log.debug(session.server.config.name, 'dropped a client response to no outstanding request');
    return;
  }
  session.serverRequests!.delete(proxyId);
  session.upstream.serverRequests.delete(childId);
  writeToChild(session.upstream, JSON.stringify({ ...msg, id: childId }));
}

function forwardNotification(session: Session, msg: JsonRpcMessage): void {
  const up = session.upstream;
  // The child was initialized once by the proxy; a session's own `initialized` is ours to absorb. A client's
  // roots are paths on the client's machine: they must never become a server's sandbox on this host.
  if (msg.method === 'notifications/initialized' || msg.method === 'notifications/roots/list_changed') return;
  if (msg.method === 'notifications/cancelled') return cancelFromClient(session, msg);
  // MCP's client notifications are all notifications/*; a "tools/call" without an id would be a call that
  // answers nobody and that no policy, limit or audit sees.
  if (!msg.method!.startsWith('notifications/')) return;
  writeToChild(up, JSON.stringify(msg));
}

/**
 * notifications/cancelled names the client's id; the child knows the request by its child id. The client
 * is answered at once (it ignores late answers), and a late answer from the child is dropped.
 */
function cancelFromClient(session: Session, msg: JsonRpcMessage): void {
  const up = session.upstream;
  const requestId = msg.params?.requestId;
  for (const [childId, pending] of up.pending) {
    if (pending.session !== session || pending.clientId !== requestId) continue;
    if (pending.method === 'initialize') return; // spec: initialize MUST NOT be cancelled
    writeToChild(up, JSON.stringify({ ...msg, params: { ...msg.params, requestId: childId } }));
    abandonPending(up, childId, pending);
    countAnswer(up.server, pending, 'cancelled by the client');
    answerPending(pending, errorText(pending.clientId, REQUEST_CANCELLED, 'Request cancelled'));
    return;
  }
  // Still waiting for the lane: it never reaches the child.
  const queued = up.laneQueue.findIndex((entry) => entry.session === session && entry.clientId === requestId);
  if (queued === -1) return;
  const [entry] = up.laneQueue.splice(queued, 1);
  entry.drop();
  answer(session, entry.exchange, errorText(requestId as JsonRpcId, REQUEST_CANCELLED, 'Request cancelled'));
}

/** Subscriptions outlive their requests, so their number and size per session are bounded. */
function subscriptionRefusal(session: Session, uri: string): string | null {
  const limits = session.server.proxy.limits;
  if (uri.length > limits.maxSubscriptionUriChars) return 'Subscription URI too long';
  const mine = session.subscriptions;
  if (!mine?.has(uri) && (mine?.size ?? 0) >= limits.maxSubscriptionsPerSession) {
    return 'Too many subscriptions for this session';
  }
  const onChild = session.upstream.subscriptions;
  if (!onChild.has(uri) && onChild.size >= limits.maxSubscribedUrisPerChild) return 'Too many resources subscribed on this server';
  return null;
}

/** resources/subscribe is reference-counted per URI; only the first subscriber reaches the child. */
function takeSubscription(session: Session, uri: string): boolean {
  if (session.subscriptions?.has(uri)) return false;
  (session.subscriptions ??= new Set()).add(uri);
  return holdUri(session.upstream, uri);
}

/** One more reference to a subscribed URI on the child; true for the first (the caller subscribes the child). */
function holdUri(up: Upstream, uri: string): boolean {
  const count = up.subscriptions.get(uri) ?? 0;
  up.subscriptions.set(uri, count + 1);
  return count === 0;
}

/** …and only the last unsubscribe does. */
function dropSubscription(session: Session, uri: string): boolean {
  if (!session.subscriptions?.delete(uri)) return false;
  return releaseSubscription(session.upstream, uri, false);
}

/** Drops one reference; at zero the child is told (or, with `send` false, the caller forwards the request). */
function releaseSubscription(up: Upstream, uri: string, send = true): boolean {
  const count = (up.subscriptions.get(uri) ?? 1) - 1;
  if (count > 0) {
    up.subscriptions.set(uri, count);
    return false;
  }
  up.subscriptions.delete(uri);
  if (send && up.state === 'ready') sendOwnRequest(up, 'resources/unsubscribe', { uri });
  return true;
}

// Child → client ───────

/** One line of child stdout. A line that is not JSON-RPC is logged by its first bytes and skipped. */
function handleChildLine(up: Upstream, line: string, raw: Buffer | null = null): void {
  const maxDepth = up.server.proxy.limits.maxJsonDepth;
  if (jsonDepthExceeds(line, maxDepth)) {
    // Re-serialising it (JSON.stringify) would overflow the stack; if it answers a request, that one fails now.
    logBadChildLine(up, line, `nested deeper than ${maxDepth} levels`);
    const scanner = createIdScanner();
    scanner.feed(raw ?? Buffer.from(line));
    // Only an answer (no "method") answers one of our requests; a child's own request may reuse the number.
    if (scanner.hasMethod()) return;
    return failAnswer(up, scanner.id(), INTERNAL_ERROR, `MCP server's answer was nested deeper than ${maxDepth} levels`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(line);
  } catch {
    return logBadChildLine(up, line, 'not JSON');
  }
  // 2025-03-26 children may write a batch on one line (spec 2025-03-26 basic/transports §stdio).
  if (Array.isArray(parsed)) {
    for (const item of parsed) handleChildMessage(up, item, JSON.stringify(item), null);
    return;
  }
  handleChildMessage(up, parsed, line, raw);
}

function handleChildMessage(up: Upstream, parsed: unknown, line: string, raw: Buffer | null): void {
  const kind = jsonRpcKind(parsed);
  if (kind === null) {
    logBadChildLine(up, line, 'not a JSON-RPC message');
    // …but if it names a request in flight (both result and error, or neither), that request is answered now
    // rather than left to wait out requestTimeoutMs.
    const id = isObject(parsed) && parsed.method === undefined ? parsed.id : undefined;
    if (typeof id === 'number' && up.pending.get(id)?.session) failAnswer(up, id, INTERNAL_ERROR, 'The MCP server answered with an invalid message');
    return;
  }
  const msg = parsed as JsonRpcMessage;
  if (kind === 'response') return routeChildResponse(up, msg, line, raw);
  if (kind === 'request') return routeChildRequest(up, msg);
  routeChildNotification(up, msg, line);
}

function logBadChildLine(up: Upstream, line: string, why: string): void {
  const { config, proxy } = up.server;
  proxy.log.warn(config.name, `skipped a stdout line (${why}, ${Buffer.byteLength(line)} bytes) starting ${headOf(maskSecrets(line, config.secrets))}`);
}

function routeChildResponse(up: Upstream, msg: JsonRpcMessage, line: string, raw: Buffer | null): void {
  const pending = typeof msg.id === 'number' ? up.pending.get(msg.id) : undefined;
  if (!pending) {
    // A late answer to a request given up on: the child is done with it.
    if (typeof msg.id === 'number') up.abandoned.delete(msg.id);
    up.server.proxy.log.debug(up.server.config.name, `dropped a response to no pending request (id ${headOf(maskSecrets(String(msg.id), up.server.config.secrets))})`);
    return;
  }
  settlePending(up, msg.id as number);
  // An error that is not {code: integer, message: string} (JSON-RPC 2.0 §5.1) is one a strict client cannot
  // read: it would drop the answer and wait out its own timeout. It becomes -32603, re-serialised.
  if (msg.error !== undefined && !isErrorObject(msg.error)) {
    msg.error = { code: INTERNAL_ERROR, message: 'The MCP server answered with an invalid error' };
    line = '';
    raw = null;
  }
  countAnswer(up.server, pending, answerOutcome(msg));
  // A filtered list is re-serialised: the child's own bytes still hold the tools it removed.
  if (pending.method === 'tools/list' && filterToolList(up, msg)) return answerFiltered(pending, msg);
  if (pending.onAnswer) return pending.onAnswer(msg, line, raw);
  if (msg.error !== undefined && pending.method === 'resources/subscribe' && pending.session && pending.uri !== undefined) {
    dropSubscription(pending.session, pending.uri); // roll back the reference taken optimistically
  }
  answerPending(pending, withId(line, raw, msg, pending.clientId));
}

function isErrorObject(error: unknown): boolean {
  return isObject(error) && Number.isInteger(error.code) && typeof error.message === 'string';
}

/** Removes a pending entry and its in-flight count, and the lane it held. */
function settlePending(up: Upstream, childId: number): void {
  const pending = up.pending.get(childId);
  if (!pending) return;
  up.pending.delete(childId);
  if (pending.session) pending.session.inflight--;
  if (up.laneHolder === childId) releaseLane(up);
}

/**
 * Delivers an answer to where its request came from: the POST still waiting for it (even if its session has
 * just ended: the client is still on the line), else the session's stream while the session lives.
 */
function answerPending(pending: Pending, text: Outgoing): void {
  if (pending.exchange) return answerExchange(pending.exchange, text);
  if (pending.session && !pending.session.closed) answer(pending.session, null, text);
}

/** Answers every request in flight on a child at once (it exited, was stopped, or closed its output). */
function failPending(up: Upstream, message: string): void {
  const entries = [...up.pending.entries()];
  up.pending.clear();
  for (const [, pending] of entries) {
    if (pending.session) pending.session.inflight--;
    countAnswer(up.server, pending, 'server exited or stopped');
    answerPending(pending, errorText(pending.clientId, SERVER_EXITED, message));
    const call = pending.session?.call;
    // A call waiting for its client's retry keeps the reason for it (until it expires): the retry gets it.
    if (call?.continuation && !call.finished && !call.exchange) {
      call.asked = null;
      call.lateAnswer = { jsonrpc: '2.0', id: call.clientId, error: { code: SERVER_EXITED, message } };
    } else if (call) endCall(call);
  }
  for (const { session, proxyId } of up.serverRequests.values()) session.serverRequests?.delete(proxyId);
  up.serverRequests.clear();
  if (up.laneHolder !== null) releaseLane(up);
}

/**
 * A request from the child to its client. ping and roots/list are the proxy's to answer. Anything else
 * (sampling, elicitation) carries a prompt or a question meant for the user whose request caused it, so it is
 * delivered only when that user is certain (attributeServerRequest); otherwise the child gets an error.
 */
function routeChildRequest(up: Upstream, msg: JsonRpcMessage): void {
  const { config, proxy } = up.server;
  const id = msg.id as JsonRpcId;
  if (msg.method === 'ping') return void writeToChild(up, resultText(id, {}));
  if (msg.method === 'roots/list' && !asksClientsForRoots(up)) return void writeToChild(up, rootsAnswer(up, id));
  // Asked outside any request (at start-up, say): nobody's roots can be given, so none are.
  if (msg.method === 'roots/list' && !laneHolderSession(up)) return void writeToChild(up, resultText(id, { roots: [] }));
  // A second request under an id still waiting would overwrite the first one's routing (and let a child
  // queue requests past the limit below under one id).
  if (up.serverRequests.has(id)) {
    proxy.log.warn(config.name, `refused ${msg.method}: its id is that of a request still waiting for a client`);
    return void writeToChild(up, errorText(id, INVALID_REQUEST, 'Duplicate request id'));
  }
  if (up.serverRequests.size >= proxy.limits.maxServerRequestsPerChild) {
    proxy.log.warn(config.name, `refused ${msg.method}: ${up.serverRequests.size} requests to clients already wait for an answer`);
    return void writeToChild(up, errorText(id, SERVER_ERROR, 'Too many requests waiting for a client'));
  }
  const call = laneHolderSession(up)?.call;
  if (call && !maybeAbandoned(up)) return askClient(call, msg);
  const target = attributeServerRequest(up, msg.method!);
  if (typeof target === 'string') {
    proxy.log.warn(config.name, `refused ${msg.method} from the server: ${target}`);
    // -32601 is what an SDK client without the capability answers, so servers already handle it.
    return void writeToChild(up, errorText(id, METHOD_NOT_FOUND, `Client cannot take ${msg.method}: not routable through this proxy`));
  }
  // The child's own id may collide with ids of other children or of earlier runs; a proxy id cannot.
  const proxyId = `proxy-${up.nextId++}`;
  (target.session.serverRequests ??= new Map()).set(proxyId, id);
  up.serverRequests.set(id, { session: target.session, proxyId });
  writeEvent(target.stream, JSON.stringify({ ...msg, id: proxyId }));
}

/** The session of the request holding this child's lane (a 2026-07-28 call's has `call`), if one runs. */
function laneHolderSession(up: Upstream): Session | null {
  return up.laneHolder === null ? null : up.pending.get(up.laneHolder)?.session ?? null;
}

/** A shared child whose operator enabled asking ("clientCapabilities"): it has a lane (section 8). */
function hasLane(up: Upstream): boolean {
  return up.owner === null && !!up.server.config.clientCapabilities?.length;
}

/** A shared child whose operator listed "roots" in "clientCapabilities": its roots/list goes to a client. */
function asksClientsForRoots(up: Upstream): boolean {
  return up.owner === null && !!up.server.config.clientCapabilities?.includes('roots');
}

/** roots/list is answered from the operator's "roots": a client's roots are paths on another machine. */
function rootsAnswer(up: Upstream, id: JsonRpcId): string {
  const roots = up.server.config.roots;
  if (!roots) return errorText(id, METHOD_NOT_FOUND, 'Method not found');
  return resultText(id, { roots: roots.map((path) => ({ uri: pathToFileURL(path).href, name: basename(path) || path })) });
}

const CAPABILITY_FOR_METHOD: Readonly<Record<string, ClientCapability>> = {
  'sampling/createMessage': 'sampling',
  'elicitation/create': 'elicitation',
  'roots/list': 'roots',
};

/**
 * The session (and stream) a child→client request is for, or why there is none. A per-session child has one
 * session. A shared child's request can only be pinned on a session when exactly one client request is in
 * flight on it: with two, it may belong to either, and a wrong guess shows one user another's prompt.
 */
function attributeServerRequest(up: Upstream, method: string): { session: Session; stream: SseStream } | string {
  const cap = CAPABILITY_FOR_METHOD[method];
  let session: Session | null = null;
  let exchange: Exchange | null = null;
  if (up.owner) session = up.owner;
  else {
    if (cap && !up.server.config.clientCapabilities?.includes(cap)) return `${cap} is not in this server's "clientCapabilities"`;
    let inflight = 0;
    if (hasLane(up)) {
      // The holder is the only request in flight that can ask (the others are lists); with none (or one given
      // up on still holding it), the ask belongs to nobody who can be named.
      const holder = up.laneHolder === null ? undefined : up.pending.get(up.laneHolder);
      if (!holder?.session) return 'no request that may ask is running on this server';
      if (maybeAbandoned(up)) return ABANDONED_REFUSAL(method);
      return deliverable(holder.session, holder.exchange, cap);
    }
    for (const pending of up.pending.values()) {
      if (!pending.session) continue;
      if (++inflight > 1) break;
      session = pending.session;
      exchange = pending.exchange;
    }
    if (inflight !== 1) {
      return `${inflight} client requests are in flight on this shared server, so the request's session is not certain; set "sessions": "per-session" for this server to use ${method}`;
    }
    // A request given up on may still be running on the child, and this may be its request.
    if (maybeAbandoned(up)) return ABANDONED_REFUSAL(method);
  }
  return deliverable(session, exchange, cap);
}

function deliverable(session: Session | null, exchange: Exchange | null, cap: ClientCapability | undefined): { session: Session; stream: SseStream } | string {
  if (!session || session.closed || session.transport === 'modern') return 'no client session is connected';
  if (cap && !session.caps[cap]) return `the client did not declare the ${cap} capability`;
  const stream = exchange?.sse && !exchange.sse.closed ? exchange.sse : firstOpen(session.exchanges) ?? session.stream;
  if (!stream) return 'the client has no open stream to receive it';
  return { session, stream };
}

function firstOpen(exchanges: Set<Exchange> | null): SseStream | null {
  for (const exchange of exchanges ?? []) if (exchange.sse && !exchange.sse.closed) return exchange.sse;
  return null;
}

function routeChildNotification(up: Upstream, msg: JsonRpcMessage, line: string): void {
  const params = msg.params ?? {};
  if (msg.method === 'notifications/progress') {
    const pending = typeof params.progressToken === 'number' ? up.pending.get(params.progressToken) : undefined;
    if (!pending?.session || pending.clientToken === undefined || pending.session.closed) return;
    const text = JSON.stringify({ ...msg, params: { ...params, progressToken: pending.clientToken } });
    return deliver(pending.session, pending.exchange, text);
  }
  if (msg.method === 'notifications/cancelled') {
    const target = up.serverRequests.get(params.requestId as JsonRpcId);
    if (!target) return;
    up.serverRequests.delete(params.requestId as JsonRpcId);
    target.session.serverRequests?.delete(target.proxyId);
    target.session.call?.asked?.delete(target.proxyId);
    return deliver(target.session, null, JSON.stringify({ ...msg, params: { ...params, requestId: target.proxyId } }));
  }
  if (msg.method === 'notifications/tools/list_changed' && up.server.config.tools?.readOnly) refreshToolHints(up);
  if (up.listeners.size) notifyListeners(up, msg);
  const uri = msg.method === 'notifications/resources/updated' ? params.uri : undefined;
  for (const session of up.sessions) {
    if (uri === undefined || session.subscriptions?.has(uri as string)) deliver(session, null, line);
  }
}

// Delivery ───────

/** An answer to a client request: into its POST exchange (Streamable) or onto the session's stream. */
function answer(session: Session, exchange: Exchange | null, text: Outgoing): void {
  if (exchange) return answerExchange(exchange, text);
  if (session.stream) writeEvent(session.stream, text);
}

/** A message that is not an answer: the request's open POST stream if any, else the session's stream. */
function deliver(session: Session, exchange: Exchange | null, text: string): void {
  const stream = exchange?.sse && !exchange.sse.closed ? exchange.sse : session.stream;
  if (stream) writeEvent(stream, text);
}

// ── 7. HTTP: guards, /mcp, /sse, health ─────────────────────────────────────────────────────────────────
//
// Every rejection goes through `reject`, which pairs an HTTP status with a JSON-RPC error body (the SDK's
// createJsonErrorResponse shape, id null). Texts sent to clients are fixed; details go to the log.

const SSE_HEADERS: Readonly<Record<string, string>> = {
  'Content-Type': 'text/event-stream',
  'Cache-Control': 'no-cache, no-transform',
  Connection: 'keep-alive',
  // nginx and friends buffer responses unless told not to (spec 2026-07-28 §Receiving Messages, SDK).
  'X-Accel-Buffering': 'no',
};
const KEEPALIVE_COMMENT = ': keepalive\n\n';
const EVENT_HEAD = 'event: message\ndata: ';
const EVENT_TAIL = '\n\n';
const CORS_ALLOW_HEADERS = 'Authorization, Content-Type, Accept, Mcp-Session-Id, MCP-Protocol-Version, Mcp-Method, Mcp-Name, Last-Event-ID';
const CORS_EXPOSE_HEADERS = 'Mcp-Session-Id, WWW-Authenticate';

function reject(
  res: http.ServerResponse, status: number, code: number, message: string, headers: Record<string, string> = {}, id: JsonRpcId | null = null, data?: unknown,
): void {
  if (res.headersSent) return void res.end();
  const body = data === undefined ? errorText(id, code, message) : JSON.stringify({ jsonrpc: '2.0', id, error: { code, message, data } });
  res.writeHead(status, { ...headers, 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

function sendJson(res: http.ServerResponse, status: number, body: string, headers: Record<string, string> = {}): void {
  res.writeHead(status, { ...headers, 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

function unavailable(res: http.ServerResponse, up: Upstream, id: JsonRpcId | null = null): void {
  const limits = up.server.proxy.limits;
  const message = up.state === 'errored' ? 'MCP server failed and is not running' : `MCP server is ${up.state}; retry later`;
  reject(res, 503, SERVER_ERROR, message, up.state === 'errored' ? {} : { 'Retry-After': String(limits.retryAfterS) }, id);
}

// SSE streams ───────

/** Opens an event stream with its teardown registered at once (P6): one `onClose`, run exactly once. */
function openStream(proxy: Proxy, res: http.ServerResponse, headers: Record<string, string>, onClose: (() => void) | null): SseStream {
  const stream: SseStream = { res, proxy, closed: false, onClose };
  res.writeHead(200, { ...SSE_HEADERS, ...headers });
  res.flushHeaders();
  proxy.streams.add(stream);
  res.on('close', () => closeStream(stream));
  stream.onClose = () => {
    proxy.streams.delete(stream);
    onClose?.();
  };
  return stream;
}

function closeStream(stream: SseStream): void {
  if (stream.closed) return;
  stream.closed = true;
  if (!stream.res.writableEnded) stream.res.end();
  const onClose = stream.onClose;
  stream.onClose = null;
  onClose?.();
}

/** One `message` event; a client that does not read is cut off by the backlog checks (section 7, Backlog). */
function writeEvent(stream: SseStream, text: Outgoing): void {
  if (stream.closed) return;
  const res = stream.res;
  if (!roomFor(stream.proxy, res)) {
    closeStream(stream);
    return void res.destroy();
  }
  if (typeof text === 'string') res.write(`${EVENT_HEAD}${withoutCr(text)}${EVENT_TAIL}`);
  else {
    const pieces = text.some((piece) => piece.includes(CARRIAGE_RETURN)) ? [withoutCrBytes(text)] : text;
    // Corked, the pieces leave in one writev.
    res.cork();
    res.write(EVENT_HEAD);
    for (const piece of pieces) res.write(piece);
    res.write(EVENT_TAIL);
    res.uncork();
  }
  trackBacklog(stream.proxy, res);
}

// Backlog ───────
//
// A client that never reads leaves what we write queued in this process. Per connection: a write to one that
// already holds more than maxQueuedBytesPerConnection closes it instead (checked before the write, so one
// large answer still reaches a client that reads). In total: after a write, while all connections together
// hold more than maxQueuedBytesTotal, the one holding the most is closed (200 streams that never read, each
// under its own limit, reached ~1 GB before this). Sockets with bytes queued are kept in proxy.backlogged
// until they drain, so the total costs a pass over those only.

/**
 * Bytes a connection holds unread: its socket's buffer, plus answers written to pipelined requests queued
 * behind an earlier response (Node keeps those in the response itself, with no socket attached yet).
 */
function queuedOn(socket: Socket): number {
  let bytes = socket.writableLength;
  // Once attached, a response's bytes move into the socket's buffer, counted above.
  for (const res of DETACHED.get(socket) ?? []) if (!res.socket) bytes += res.writableLength;
  return bytes;
}

/** Responses written before their socket was theirs, per connection, until they finish or close. */
const DETACHED = new WeakMap<Socket, Set<http.ServerResponse>>();

/**
 * Closes the connection a response belongs to. Destroying a response queued behind an earlier one on a
 * pipelined connection (no socket of its own yet) would leave the connection, and what it holds, open.
 */
function closeConnection(res: http.ServerResponse): void {
  res.req.socket.destroy();
  if (!res.destroyed) res.destroy();
}

/** False (logged; the caller closes the connection) when it already holds more than its share unread. */
function roomFor(proxy: Proxy, res: http.ServerResponse): boolean {
  if (res.req.socket.destroyed) return false; // closed already (logged then): later answers just go nowhere
  const queued = queuedOn(res.req.socket);
  if (queued <= proxy.limits.maxQueuedBytesPerConnection) return true;
  proxy.log.warn('http', `closed a connection with ${queued} bytes unread (maxQueuedBytesPerConnection ${proxy.limits.maxQueuedBytesPerConnection})`);
  return false;
}

/** After a write: a connection left holding bytes joins the backlog, and the total is enforced. */
function trackBacklog(proxy: Proxy, res: http.ServerResponse): void {
  const socket = res.req.socket;
  if (!res.socket && res.writableLength > 0) holdDetached(socket, res);
  if (queuedOn(socket) === 0) return;
  if (!proxy.backlogged.has(socket)) {
    proxy.backlogged.add(socket);
    socket.once('drain', () => proxy.backlogged.delete(socket));
  }
  let total = 0;
  for (const held of proxy.backlogged) total += queuedOn(held);
  while (total > proxy.limits.maxQueuedBytesTotal) {
    let largest: Socket | null = null;
    let most = -1;
    for (const held of proxy.backlogged) {
      const bytes = queuedOn(held);
      if (bytes > most) [largest, most] = [held, bytes];
    }
    if (!largest) break;
    total -= most;
    proxy.log.warn('http', `closed a connection with ${most} bytes unread: all connections together held more than ${proxy.limits.maxQueuedBytesTotal} (maxQueuedBytesTotal)`);
    proxy.backlogged.delete(largest);
    largest.destroy();
  }
}

function holdDetached(socket: Socket, res: http.ServerResponse): void {
  let held = DETACHED.get(socket);
  if (!held) DETACHED.set(socket, (held = new Set()));
  if (held.has(res)) return;
  held.add(res);
  // 'close', not 'finish': Node 24 emits 'finish' for a queued response before its bytes reach the socket.
  res.once('close', () => held!.delete(res));
}

/**
 * A bare CR ends a line in SSE (WHATWG HTML §9.2.6), so one inside `data:` would cut the event short. In
 * valid JSON a raw CR can only be whitespace between tokens (strings must escape it), and everything written
 * here is valid JSON (ours, or a child's line that parsed), so dropping it changes no value.
 */
function withoutCr(text: string): string {
  return text.includes('\r') ? text.replace(/\r/g, '') : text;
}

/** The same for a child's spliced bytes: 0x0D never occurs inside a multi-byte UTF-8 sequence. */
function withoutCrBytes(pieces: readonly Buffer[]): Buffer {
  const joined = Buffer.concat(pieces);
  let kept = 0;
  for (const byte of joined) if (byte !== CARRIAGE_RETURN) joined[kept++] = byte;
  return joined.subarray(0, kept);
}

// Streamable HTTP exchanges ───────

/** An answer for a POST: streamed as it comes (SSE), or collected and sent as one JSON body. */
function answerExchange(exchange: Exchange, text: Outgoing): void {
  if (exchange.done) return;
  exchange.remaining--;
  if (exchange.sse) {
    writeEvent(exchange.sse, text);
    if (exchange.remaining === 0) {
      exchange.done = true;
      closeStream(exchange.sse);
    }
    return;
  }
  if (exchange.remaining > 0) return holdAnswer(exchange, text);
  exchange.answers.push(text);
  releaseHeld(exchange);
  exchange.done = true;
  const res = exchange.res;
  if (res.destroyed) return;
  if (!roomFor(exchange.proxy, res)) return closeConnection(res);
  const [first] = exchange.answers;
  if (!exchange.batch && typeof first === 'string') sendJson(res, 200, first);
  else sendPieces(res, exchange.batch ? batchPieces(exchange.answers) : (first as readonly Buffer[]));
  trackBacklog(exchange.proxy, res);
}

/**
 * A batch is answered as one body once every answer is in, so the answers before the last are held here.
 * They are bounded per batch (maxBatchAnswerBytes) and across the proxy (maxQueuedBytesTotal): past either,
 * the batch is given up: its connection closes and its requests still running are cancelled on the child.
 */
function holdAnswer(exchange: Exchange, text: Outgoing): void {
  const proxy = exchange.proxy;
  const size = typeof text === 'string' ? text.length : text.reduce((sum, piece) => sum + piece.length, 0);
  const limits = proxy.limits;
  if (exchange.heldBytes + size > limits.maxBatchAnswerBytes || proxy.heldAnswerBytes + size > limits.maxQueuedBytesTotal) {
    const which = exchange.heldBytes + size > limits.maxBatchAnswerBytes ? 'maxBatchAnswerBytes' : 'maxQueuedBytesTotal';
    proxy.log.warn('http', `gave up on a batch: its answers would hold more than ${which} allows; closed its connection`);
    return dropExchange(exchange);
  }
  exchange.answers.push(text);
  exchange.heldBytes += size;
  proxy.heldAnswerBytes += size;
}

function releaseHeld(exchange: Exchange): void {
  exchange.proxy.heldAnswerBytes -= exchange.heldBytes;
  exchange.heldBytes = 0;
}

/** The client is gone or over a limit: free what the exchange holds and stop the child's work on it. */
function dropExchange(exchange: Exchange): void {
  if (exchange.done) return;
  exchange.done = true;
  releaseHeld(exchange);
  exchange.answers = [];
  closeConnection(exchange.res);
  const up = exchange.session.upstream;
  for (const [childId, pending] of up.pending) {
    if (pending.exchange === exchange) abortPending(up, childId, pending, 'client gone', SERVER_ERROR, 'Client connection closed');
  }
}

/** A JSON body sent as pieces (strings and spliced child bytes) in one corked write. */
function sendPieces(res: http.ServerResponse, pieces: readonly (string | Buffer)[]): void {
  let length = 0;
  for (const piece of pieces) length += typeof piece === 'string' ? Buffer.byteLength(piece) : piece.length;
  res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': length });
  res.cork();
  for (const piece of pieces) res.write(piece);
  res.end();
  res.uncork();
}

function batchPieces(answers: readonly Outgoing[]): (string | Buffer)[] {
  const pieces: (string | Buffer)[] = ['['];
  answers.forEach((answer, i) => {
    if (i > 0) pieces.push(',');
    if (typeof answer === 'string') pieces.push(answer);
    else pieces.push(...answer);
  });
  pieces.push(']');
  return pieces;
}

// Request guards ───────

type Accepts = { json: boolean; sse: boolean };

/**
 * Lenient Accept parsing (github.com/anthropics/claude-ai-mcp/issues/76): missing, `*∕*` or `application/json` alone are accepted,
 * because Claude.ai has sent `*∕*`. Only a header naming neither type is refused.
 */
function parseAccept(header: string | undefined): Accepts | null {
  if (!header) return { json: true, sse: true };
  const types = header.split(',').map((part) => part.split(';')[0].trim().toLowerCase());
  const any = types.includes('*/*') || types.includes('application/*');
  const json = any || types.includes('application/json');
  const sse = any || types.includes('text/event-stream') || types.includes('text/*');
  return json || sse ? { json, sse } : null;
}

function isJsonContentType(header: string | undefined): boolean {
  return header !== undefined && header.split(';')[0].trim().toLowerCase() === 'application/json';
}

/** Hostname of a Host header, without the port; IPv6 keeps its brackets. */
function hostnameOf(host: string): string {
  if (host.startsWith('[')) return host.slice(0, host.indexOf(']') + 1).toLowerCase();
  const colon = host.indexOf(':');
  return (colon === -1 ? host : host.slice(0, colon)).toLowerCase();
}

/**
 * DNS-rebinding protection (spec 2025-11-25 transports §Security Warning: an invalid Origin MUST get 403).
 * Allowed: no Origin (non-browser clients), loopback origins, Claude's, configured ones, and the proxy's own
 * origin when tokens are configured.
 */
function originAllowed(proxy: Proxy, origin: string | undefined, host: string | undefined): boolean {
  if (origin === undefined) return true;
  const normalized = origin.toLowerCase().replace(/\/$/, '');
  if (DEFAULT_ALLOWED_ORIGINS.includes(normalized)) return true;
  if (proxy.options.allowedOrigins.includes(normalized) || proxy.options.corsOrigins.includes(normalized)) return true;
  let url: URL;
  try {
    url = new URL(normalized);
  } catch {
    return false; // "null" and other opaque origins
  }
  if (LOOPBACK_HOSTNAMES.has(url.hostname) || isLoopbackHost(url.hostname)) return true;
  if (ownOrigin(proxy, url)) return true;
  // "Own origin" is judged from Host, which a DNS-rebinding page controls. With tokens that is harmless (the
  // page has no token); without them, on a non-loopback bind, it would let the page in, so it is not used.
  if (proxy.tokens.length === 0) return false;
  return host !== undefined && url.host === host.toLowerCase();
}

function hostAllowed(proxy: Proxy, host: string | undefined): boolean {
  if (!proxy.loopbackBind || host === undefined || proxy.allowedHosts.has(hostnameOf(host))) return true;
  return subdomainLabel(proxy, hostnameOf(host)) !== null;
}

/** The public URL's origin and, with host routes, {name}.{baseDomain} on its scheme: configured, not from Host. */
function ownOrigin(proxy: Proxy, url: URL): boolean {
  const publicUrl = proxy.publicUrl;
  if (!publicUrl) return false;
  if (url.origin === publicUrl.origin) return true;
  return url.protocol === publicUrl.protocol && url.port === publicUrl.port && subdomainLabel(proxy, url.hostname) !== null;
}

/** What comes before `.{baseDomain}` in a (lowercase) hostname, or null: not under it, or no base domain. */
function subdomainLabel(proxy: Proxy, hostname: string): string | null {
  const base = proxy.options.baseDomain;
  return base && hostname.endsWith(`.${base}`) ? hostname.slice(0, -base.length - 1) : null;
}

/**
 * Bearer tokens only from the Authorization header, never the query (spec authorization §Token Usage). The
 * credential a request acts as: "token N" for a static token (1-based, never the token itself), "oauth:ID"
 * for an OAuth grant, or "anonymous" without auth. An OAuth token works only on the server it was issued for.
 */
function authorized(proxy: Proxy, header: string | undefined, route: Route | null = null): string | typeof FORBIDDEN | { failure: 'missing' | 'invalid' } {
  if (proxy.tokens.length === 0 && !proxy.oauth) return ANONYMOUS;
  const match = header ? /^Bearer[ \t]+(\S+)\s*$/i.exec(header) : null;
  if (!match) return { failure: header ? 'invalid' : 'missing' };
  const digest = sha256(match[1]);
  const index = tokenDigestIndex(digest, proxy.tokens);
  if (index !== -1) return `token ${index + 1}`;
  const grant = proxy.oauth && grantOfAccessToken(proxy.oauth, digest.toString('hex'));
  if (!grant) return { failure: 'invalid' };
  if (route && grant.audience !== '*' && grant.audience !== route.server.config.name) return FORBIDDEN;
  return `oauth:${grant.id}`;
}

const ANONYMOUS = 'anonymous';
const FORBIDDEN = Symbol('forbidden');

function corsHeaders(proxy: Proxy, origin: string | undefined): Record<string, string> {
  if (!origin || !proxy.options.corsOrigins.includes(origin.toLowerCase())) return {};
  return { 'Access-Control-Allow-Origin': origin, Vary: 'Origin', 'Access-Control-Expose-Headers': CORS_EXPOSE_HEADERS };
}

type ParsedBody = { messages: JsonRpcMessage[]; kinds: MessageKind[]; batch: boolean };

/**
 * Reads and parses a POST's JSON-RPC body, or answers the error itself and returns null: 413 past
 * maxBodyBytes, 503 when bodies being read across the proxy would pass maxBodyBytesInFlight (parsing blocks
 * the event loop, and eight 4 MiB batches at once stalled even /healthz for seconds), 400 for the rest.
 */
async function readMessages(proxy: Proxy, req: http.IncomingMessage, res: http.ServerResponse): Promise<ParsedBody | null> {
  return withBody(proxy, req, res, proxy.limits.maxBodyBytes, (body) => parseBody(res, body, proxy.limits));
}

/** Reads a body of at most `limit` bytes and hands it to `use`; its bytes stay counted in flight until `use` returns. */
async function withBody<T>(
  proxy: Proxy, req: http.IncomingMessage, res: http.ServerResponse, limit: number, use: (body: Buffer) => T,
): Promise<T | null> {
  const reserved = { bytes: 0 };
  try {
    const body = await readBody(proxy, req, res, reserved, limit);
    return body && use(body);
  } finally {
    proxy.bodyBytesInFlight -= reserved.bytes;
  }
}

/** Reads the body, counting its bytes into proxy.bodyBytesInFlight (`reserved` says how many to give back). */
function readBody(
  proxy: Proxy, req: http.IncomingMessage, res: http.ServerResponse, reserved: { bytes: number }, maxBodyBytes: number,
): Promise<Buffer | null> {
  const { maxBodyBytesInFlight } = proxy.limits;
  return new Promise((resolve) => {
    const declared = Number(req.headers['content-length']);
    if (declared > maxBodyBytes) return resolve(refuse(413, INVALID_REQUEST, 'Request body too large'));
    // Bytes are counted as they arrive, not as declared: a few sockets that declare 4 MiB and send nothing
    // would otherwise hold the whole budget and refuse everyone else.
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > maxBodyBytes) return finish(refuse(413, INVALID_REQUEST, 'Request body too large'));
      if (size > reserved.bytes && !reserve(size - reserved.bytes)) return finish(busy());
      chunks.push(chunk);
    });
    req.on('end', () => resolve(chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, size)));
    // Client went away: nothing to answer ('close' after 'end' changes nothing: a promise settles once).
    req.on('error', () => resolve(null));
    req.on('close', () => resolve(null));

    function finish(value: null): void {
      req.removeAllListeners('data');
      req.removeAllListeners('end');
      resolve(value);
    }
  });

  function reserve(bytes: number): boolean {
    if (proxy.bodyBytesInFlight + bytes > maxBodyBytesInFlight) return false;
    proxy.bodyBytesInFlight += bytes;
    reserved.bytes += bytes;
    return true;
  }

  function busy(): null {
    return refuse(503, SERVER_ERROR, 'Server busy; retry later', { 'Retry-After': String(proxy.limits.retryAfterS) });
  }

  function refuse(status: number, code: number, message: string, headers: Record<string, string> = {}): null {
    // Close the connection after answering: the rest of the body is not worth reading.
    reject(res, status, code, message, { ...headers, Connection: 'close' });
    req.resume();
    return null;
  }
}

/** JSON-RPC body → messages, or an answered 400. */
function parseBody(res: http.ServerResponse, body: Buffer, limits: Limits): ParsedBody | null {
  const text = body.toString('utf8');
  // Checked before parsing: a 10 KB body nested 5,000 deep parses, then overflows the stack when re-serialised.
  if (jsonDepthExceeds(text, limits.maxJsonDepth)) {
    return reject(res, 400, INVALID_REQUEST, `Invalid Request: nested deeper than ${limits.maxJsonDepth} levels`), null;
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    return reject(res, 400, PARSE_ERROR, 'Parse error: body is not valid JSON'), null;
  }
  const batch = Array.isArray(parsed);
  const messages = (batch ? parsed : [parsed]) as JsonRpcMessage[];
  if (messages.length === 0) return reject(res, 400, INVALID_REQUEST, 'Invalid Request: empty batch'), null;
  if (messages.length > limits.maxBatchSize) return reject(res, 400, INVALID_REQUEST, 'Invalid Request: batch too large'), null;
  const kinds: MessageKind[] = [];
  for (const msg of messages) {
    const kind = jsonRpcKind(msg);
    if (kind === null) return reject(res, 400, INVALID_REQUEST, 'Invalid Request: not a JSON-RPC 2.0 message'), null;
    kinds.push(kind);
  }
  return { messages, kinds, batch };
}

// Router ───────

/**
 * A new connection. Past maxConnections it gets a fixed 503 and is closed before anything is read: each one
 * holds a file descriptor, and a child restarting with none left fails with EMFILE.
 */
function onConnection(proxy: Proxy, socket: Socket): void {
  if (proxy.connections.size >= proxy.maxConnections) {
    proxy.log.warn('http', `refused a connection: ${proxy.connections.size} open (maxConnections ${proxy.maxConnections})`);
    socket.end(TOO_MANY_CONNECTIONS, () => socket.destroy());
    REFUSED.add(socket);
    return;
  }
  proxy.connections.add(socket);
  socket.once('close', () => {
    proxy.connections.delete(socket);
    proxy.backlogged.delete(socket);
    DETACHED.delete(socket);
  });
}

const TOO_MANY_CONNECTIONS_BODY = errorText(null, SERVER_ERROR, 'Too many connections; retry later');
const TOO_MANY_CONNECTIONS = 'HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: application/json\r\n' +
  `Content-Length: ${TOO_MANY_CONNECTIONS_BODY.length}\r\n\r\n${TOO_MANY_CONNECTIONS_BODY}`;
/** Connections answered with TOO_MANY_CONNECTIONS: a request Node still parses on one is not served. */
const REFUSED = new WeakSet<Socket>();

/**
 * The error boundary: whatever a request makes the handlers throw, synchronously or not, costs that request
 * (500, logged) and never the process.
 */
function serveRequest(proxy: Proxy, req: http.IncomingMessage, res: http.ServerResponse): void {
  if (REFUSED.has(req.socket)) return void req.socket.destroy();
  const fail = (err: unknown) => {
    proxy.log.error('http', `internal error on ${req.method} ${headOf(req.url ?? '')}: ${describeError(err)}`);
    reject(res, 500, INTERNAL_ERROR, 'Internal error');
  };
  try {
    const handled = handleRequest(proxy, req, res);
    if (handled) handled.catch(fail);
  } catch (err) {
    fail(err);
  }
}

function handleRequest(proxy: Proxy, req: http.IncomingMessage, res: http.ServerResponse): Promise<void> | void {
  const url = req.url ?? '/';
  const q = url.indexOf('?');
  const path = q === -1 ? url : url.slice(0, q);
  if (proxy.state !== 'RUNNING') return reject(res, 503, SERVER_ERROR, 'Shutting down', { Connection: 'close' });
  // Node keeps the first maxHeadersCount fields and drops the rest silently: an Origin past them would go unseen.
  if (req.rawHeaders.length / 2 >= proxy.limits.maxHeadersCount) {
    return reject(res, 431, SERVER_ERROR, 'Request Header Fields Too Large', { Connection: 'close' });
  }
  if (path === '/healthz') return sendJson(res, 200, '{"status":"ok"}');
  if (path === '/readyz') return readiness(proxy, res, typeof authorized(proxy, req.headers.authorization) === 'string', q === -1 ? '' : url.slice(q + 1));
  const { origin, host } = req.headers;
  if (!hostAllowed(proxy, host)) return reject(res, 403, SERVER_ERROR, 'Forbidden: Host not allowed');
  if (!originAllowed(proxy, origin, host)) return reject(res, 403, SERVER_ERROR, 'Forbidden: Origin not allowed');
  const cors = corsHeaders(proxy, origin);
  for (const [name, value] of Object.entries(cors)) res.setHeader(name, value);
  if (req.method === 'OPTIONS' && cors['Access-Control-Allow-Origin']) return preflight(res);
  const query = q === -1 ? '' : url.slice(q + 1);
  const oauthAnswer = routeOAuth(proxy, req, res, path, query);
  if (oauthAnswer !== false) return oauthAnswer === true ? undefined : oauthAnswer;
  if (path === '/metrics' || path === '/') return handleOperations(proxy, req, res, path);
  const route = routeOf(proxy, host, path);
  const credential = authorized(proxy, req.headers.authorization, route);
  if (credential === FORBIDDEN) {
    // A valid token issued for another server (spec basic/authorization §Token Audience Binding).
    const challenge = `Bearer error="insufficient_scope", resource_metadata="${route && proxy.oauth ? metadataUrl(proxy.oauth, route) : ''}"`;
    return reject(res, 403, SERVER_ERROR, 'Forbidden: this token is for another server', { 'WWW-Authenticate': challenge });
  }
  if (typeof credential !== 'string') {
    return reject(res, 401, SERVER_ERROR, 'Unauthorized', { 'WWW-Authenticate': bearerChallenge(proxy, route, credential.failure) });
  }
  if (!route) return reject(res, 404, SERVER_ERROR, removedRoute(proxy, path) ? 'Not Found: this server was removed from the proxy config' : 'Not Found');
  const { server, leaf } = route;
  if (leaf === 'mcp') return handleMcp(server, req, res, credential);
  if (leaf === 'sse') return handleSseGet(server, req, res, credential, route.prefix);
  if (leaf === 'messages') return handleSseMessage(server, req, res, query, credential);
  reject(res, 404, SERVER_ERROR, 'Not Found');
}

/** /{segment}/… of a server a reload removed (the segment may come back with a later reload). */
function removedRoute(proxy: Proxy, path: string): boolean {
  const parts = path.split('/');
  return parts.length === 3 && proxy.removed.has(parts[1].toLowerCase());
}

const RETIRED_MESSAGE = 'Not Found: this server was removed or restarted by a config reload; reconnect';

/** A server runtime a reload took out of the table (removed, or replaced by its new config's). */
function retired(server: ServerRuntime): boolean {
  return server.proxy.servers.get(server.segment) !== server;
}

function preflight(res: http.ServerResponse): void {
  res.writeHead(204, {
    'Access-Control-Allow-Methods': 'GET, POST, DELETE',
    'Access-Control-Allow-Headers': CORS_ALLOW_HEADERS,
    'Access-Control-Max-Age': String(CORS_MAX_AGE_S),
  });
  res.end();
}

/**
 * The proxy is ready while it can serve: every server has answered initialize (per-session servers: are not
 * errored), except servers that gave up (errored), which are reported but do not take the healthy ones out of
 * a load balancer. `?server=NAME` answers for one server: 200 only when it is ready. Probes carry no token, so
 * names and states are shown only to an authorized caller (an unknown name is simply not ready).
 */
function readiness(proxy: Proxy, res: http.ServerResponse, detailed: boolean, query: string): void {
  const one = query ? new URLSearchParams(query).get('server') : null;
  if (one !== null) {
    const server = proxy.servers.get(serverSegment(one));
    const state = server ? serverState(server) : undefined;
    const ready = state === 'ready';
    return sendJson(res, ready ? 200 : 503, JSON.stringify(detailed && state ? { ready, state } : { ready }));
  }
  const servers: Record<string, { state: ServerState }> = {};
  const errored: string[] = [];
  let ready = true;
  for (const server of proxy.servers.values()) {
    const state = serverState(server);
    servers[server.config.name] = { state };
    if (state === 'errored') errored.push(server.config.name);
    else if (state !== 'ready') ready = false;
  }
  // …but an instance whose every server gave up serves nothing: out of the load balancer.
  if (proxy.servers.size > 0 && errored.length === proxy.servers.size) ready = false;
  sendJson(res, ready ? 200 : 503, JSON.stringify(detailed ? { ready, servers, errored } : { ready }));
}

function serverState(server: ServerRuntime): ServerState {
  return server.shared ? server.shared.state : perSessionState(server);
}

function perSessionState(server: ServerRuntime): ServerState {
  for (const up of server.upstreams) if (up.state === 'errored') return 'errored';
  return 'ready';
}

// Streamable HTTP: /{name}/mcp ───────

async function handleMcp(server: ServerRuntime, req: http.IncomingMessage, res: http.ServerResponse, credential: string): Promise<void> {
  if (req.method === 'POST') return handleMcpPost(server, req, res, credential);
  if (req.method === 'GET') return handleMcpGet(server, req, res, credential);
  if (req.method === 'DELETE') return handleMcpDelete(server, req, res, credential);
  reject(res, 405, SERVER_ERROR, 'Method not allowed', { Allow: 'GET, POST, DELETE' });
}

/**
 * Looks up the session a request names: 400 when it names none, 404 (-32001) when unknown or opened by another
 * credential (spec basic/transports §Session Management: bind sessions to the user; 404 says nothing more).
 */
function requireSession(server: ServerRuntime, req: http.IncomingMessage, res: http.ServerResponse, credential: string): Session | null {
  const id = req.headers['mcp-session-id'];
  if (typeof id !== 'string' || id === '') {
    return reject(res, 400, SERVER_ERROR, 'Bad Request: Mcp-Session-Id header is required'), null;
  }
  const session = server.sessions.get(id);
  if (!session || session.transport !== 'streamable' || session.credential !== credential) {
    return reject(res, 404, SESSION_NOT_FOUND, 'Session not found'), null;
  }
  const version = req.headers['mcp-protocol-version'];
  // Absent means the negotiated version (spec basic/transports §Protocol Version Header); any supported value is
  // accepted (the conformance suite's client sends 2025-03-26 whatever was negotiated).
  if (typeof version === 'string' && !SUPPORTED_PROTOCOL_VERSIONS.includes(version)) {
    return reject(res, 400, SERVER_ERROR, 'Bad Request: Unsupported protocol version'), null;
  }
  return session;
}

async function handleMcpPost(server: ServerRuntime, req: http.IncomingMessage, res: http.ServerResponse, credential: string): Promise<void> {
  if (!isJsonContentType(req.headers['content-type'])) {
    return reject(res, 415, SERVER_ERROR, 'Unsupported Media Type: Content-Type must be application/json');
  }
  const accepts = parseAccept(req.headers.accept);
  if (!accepts) return reject(res, 406, SERVER_ERROR, 'Not Acceptable: Accept must allow application/json or text/event-stream');
  const parsed = await readMessages(server.proxy, req, res);
  if (!parsed) return;
  // A reload may have removed or replaced the server while the body was read: nothing may start on it now.
  if (retired(server)) return reject(res, 404, SERVER_ERROR, RETIRED_MESSAGE);
  if (rateLimited(server, credential, parsed, res)) return;
  // One URL, both eras: a request claiming a version in its _meta is 2026-07-28's (section 8).
  if (isModern(parsed, req.headers['mcp-protocol-version'])) return handleModern(server, req, res, parsed.messages[0], parsed.kinds[0], accepts, credential);
  const { messages, kinds } = parsed;
  const initIndex = messages.findIndex((msg, i) => kinds[i] === 'request' && msg.method === 'initialize');
  if (initIndex !== -1) {
    if (messages.length > 1) return reject(res, 400, INVALID_REQUEST, 'Invalid Request: initialize must be sent alone');
    return initializeStreamable(server, messages[0], accepts, res, credential);
  }
  if (req.headers['mcp-session-id'] === undefined && kinds.every((kind) => kind === 'notification')) {
    // Claude.ai has sent notifications/initialized without a session id (github.com/anthropics/claude-ai-mcp/issues/99): accept and drop.
    res.writeHead(202).end();
    return;
  }
  // Unsessioned requests without a 2026-07-28 claim (a server/discover with one went to section 8) get 400
  // -32000, never -32601, which some clients read as "no such server" (github.com/anthropics/claude-ai-mcp/issues/1044).
  const session = requireSession(server, req, res, credential);
  if (!session) return;
  // Batches exist only in 2025-03-26 (removed in 2025-06-18: spec changelog).
  if (parsed.batch && session.protocolVersion !== BATCH_VERSION) {
    return reject(res, 400, INVALID_REQUEST, `Invalid Request: batches need protocol version ${BATCH_VERSION}`);
  }
  touchSession(session);
  if (session.upstream.state !== 'ready') return unavailable(res, session.upstream);
  dispatchPost(session, parsed, accepts, res);
}

/** Forwards a validated POST's messages; requests get one exchange that answers as JSON or as a stream. */
function dispatchPost(session: Session, parsed: ParsedBody, accepts: Accepts, res: http.ServerResponse): void {
  const { messages, kinds, batch } = parsed;
  const requests = kinds.filter((kind) => kind === 'request').length;
  if (requests === 0) {
    messages.forEach((msg, i) => forwardFromClient(session, msg, kinds[i], null));
    res.writeHead(202).end();
    return;
  }
  if (overPendingLimit(session, requests, res, batch ? null : (messages[0].id as JsonRpcId))) return;
  const exchange: Exchange = { proxy: session.server.proxy, session, heldBytes: 0, res, sse: null, remaining: requests, batch, answers: [], done: false };
  // Stream when the client can take it and may get messages before the answer: progress it asked for.
  if (accepts.sse && (!accepts.json || messages.some(wantsProgress))) {
    exchange.sse = openStream(session.server.proxy, res, { 'Mcp-Session-Id': session.id }, () => {
      exchange.done = true;
      session.exchanges?.delete(exchange);
    });
    (session.exchanges ??= new Set()).add(exchange);
  } else {
    // Gone before its answers: nothing can reach it any more (there is no resumption), so what it holds is
    // freed now. Its requests still finish on the child; their late answers are dropped.
    res.on('close', () => {
      if (exchange.done) return;
      exchange.done = true;
      releaseHeld(exchange);
      exchange.answers = [];
    });
  }
  messages.forEach((msg, i) => forwardFromClient(session, msg, kinds[i], exchange));
}

/** 429 for a POST whose requests would take the session past maxPendingPerSession; nothing is forwarded. */
function overPendingLimit(session: Session, requests: number, res: http.ServerResponse, id: JsonRpcId | null = null): boolean {
  const limits = session.server.proxy.limits;
  if (session.inflight + requests <= limits.maxPendingPerSession) return false;
  reject(res, 429, SERVER_ERROR, 'Too many requests in flight for this session', { 'Retry-After': String(limits.retryAfterS) }, id);
  return true;
}

function wantsProgress(msg: JsonRpcMessage): boolean {
  const meta = msg.params?._meta;
  return isObject(meta) && meta.progressToken !== undefined;
}

async function initializeStreamable(
  server: ServerRuntime, msg: JsonRpcMessage, accepts: Accepts, res: http.ServerResponse, credential: string,
): Promise<void> {
  if (server.shared && server.shared.state !== 'ready') return unavailable(res, server.shared);
  const session = createSession(server, 'streamable', credential);
  if (!session) return reject(res, 503, SERVER_ERROR, 'Too many sessions; retry later', { 'Retry-After': String(server.proxy.limits.retryAfterS) });
  beginInitialize(session, msg);
  if (!(await upstreamReady(session))) return;
  const text = initializeResult(session, msg);
  if (accepts.json) return sendJson(res, 200, text, { 'Mcp-Session-Id': session.id });
  const stream = openStream(server.proxy, res, { 'Mcp-Session-Id': session.id }, null);
  writeEvent(stream, text);
  closeStream(stream);

  /** Per-session mode starts the session's own child first; shared children are ready already. */
  async function upstreamReady(s: Session): Promise<boolean> {
    const up = s.upstream;
    if (up.state !== 'ready') await whenSettled(up);
    if (up.state === 'ready' && !res.destroyed) return true;
    if (up.state !== 'ready') unavailable(res, up);
    endSession(s);
    return false;
  }
}

function handleMcpGet(server: ServerRuntime, req: http.IncomingMessage, res: http.ServerResponse, credential: string): void {
  const accepts = parseAccept(req.headers.accept);
  if (!accepts?.sse) return reject(res, 406, SERVER_ERROR, 'Not Acceptable: Accept must allow text/event-stream');
  const session = requireSession(server, req, res, credential);
  if (!session) return;
  if (session.stream) return reject(res, 409, SERVER_ERROR, 'Conflict: only one GET stream per session');
  touchSession(session);
  session.stream = openStream(server.proxy, res, { 'Mcp-Session-Id': session.id }, () => {
    session.stream = null;
    if (!session.closed) touchSession(session); // idle time counts from when the stream closed
  });
}

function handleMcpDelete(server: ServerRuntime, req: http.IncomingMessage, res: http.ServerResponse, credential: string): void {
  const session = requireSession(server, req, res, credential);
  if (!session) return;
  endSession(session);
  sendJson(res, 200, '{}');
}

// Legacy HTTP+SSE: /{name}/sse and /{name}/messages ───────

/** GET opens the session's stream and names the POST endpoint (spec 2024-11-05 §HTTP with SSE). */
function handleSseGet(server: ServerRuntime, req: http.IncomingMessage, res: http.ServerResponse, credential: string, prefix: string): void {
  // POST here answers 405: that is how clients trying Streamable HTTP first learn to fall back (spec 2025-03-26
  // basic/transports §Backwards Compatibility).
  if (req.method !== 'GET') return reject(res, 405, SERVER_ERROR, 'Method not allowed', { Allow: 'GET' });
  if (server.shared && server.shared.state !== 'ready') return unavailable(res, server.shared);
  // Opening a legacy session is a request too (it costs a session and audit lines): it takes a token.
  const waitS = rateLimitWait(server, credential, 1);
  if (waitS > 0) {
    server.stats.rateLimited++;
    return reject(res, 429, SERVER_ERROR, RATE_LIMITED_MESSAGE, { 'Retry-After': String(waitS) });
  }
  const session = createSession(server, 'sse', credential);
  if (!session) return reject(res, 503, SERVER_ERROR, 'Too many sessions; retry later', { 'Retry-After': String(server.proxy.limits.retryAfterS) });
  session.stream = openStream(server.proxy, res, {}, () => endSession(session));
  // Relative to the route the client used (/{name}/sse, or /sse on a host or single-server route).
  session.stream.res.write(`event: endpoint\ndata: ${prefix}/messages?sessionId=${session.id}\n\n`);
}

async function handleSseMessage(
  server: ServerRuntime, req: http.IncomingMessage, res: http.ServerResponse, query: string, credential: string,
): Promise<void> {
  if (req.method !== 'POST') return reject(res, 405, SERVER_ERROR, 'Method not allowed', { Allow: 'POST' });
  const id = new URLSearchParams(query).get('sessionId');
  if (!id) return reject(res, 400, SERVER_ERROR, 'Bad Request: sessionId is required');
  const session = server.sessions.get(id);
  if (!session || session.transport !== 'sse' || session.credential !== credential) {
    return reject(res, 404, SESSION_NOT_FOUND, 'Session not found');
  }
  if (!isJsonContentType(req.headers['content-type'])) {
    return reject(res, 415, SERVER_ERROR, 'Unsupported Media Type: Content-Type must be application/json');
  }
  const parsed = await readMessages(server.proxy, req, res);
  if (!parsed || session.closed) return void (parsed && reject(res, 404, SESSION_NOT_FOUND, 'Session not found'));
  if (rateLimited(server, credential, parsed, res)) return;
  touchSession(session);
  if (overPendingLimit(session, parsed.kinds.filter((kind) => kind === 'request').length, res)) return;
  // Forward first, then answer 202: the child starts working while our 202 is being written.
  parsed.messages.forEach((msg, i) => {
    if (parsed.kinds[i] === 'request' && msg.method === 'initialize') return void initializeSse(session, msg);
    forwardFromClient(session, msg, parsed.kinds[i], null);
  });
  res.writeHead(202, { 'Content-Type': 'text/plain' }).end('Accepted');
}

async function initializeSse(session: Session, msg: JsonRpcMessage): Promise<void> {
  const up = session.upstream;
  beginInitialize(session, msg);
  if (up.state !== 'ready') await whenSettled(up);
  if (session.closed || !session.stream) return;
  if (up.state !== 'ready') return writeEvent(session.stream, errorText(msg.id as JsonRpcId, SERVER_ERROR, `MCP server is ${up.state}`));
  writeEvent(session.stream, initializeResult(session, msg));
}

// ── 8. MCP 2026-07-28: sessionless requests, discover, listen, input requests ─────────────────────────────
//
// Revision 2026-07-28 drops initialize and sessions: every request carries its protocol version and the
// client's capabilities in `_meta` (spec 2026-07-28 basic/index §Request Metadata), and a server MAY serve
// both eras on one endpoint (basic/versioning §Backward Compatibility). So a POST to /{name}/mcp whose single
// request claims a version in `_meta` takes this path; everything else is the legacy path above, unchanged.
//
//   modern request                     what the proxy does
//   server/discover                    answers from the child's cached InitializeResult
//   tools/*, resources/read|list|…,    validates headers and _meta, strips the 2026 keys, forwards on the shared
//   prompts/*, completion/complete     child under a fresh id, stamps resultType, serverInfo and cache fields
//   subscriptions/listen               a stream: the acknowledgement, then the child's list_changed and
//                                      resources/updated (resources/subscribe reference-counted on the child)
//   initialize, ping, logging/…,       404 -32601: removed in 2026-07-28
//   resources/(un)subscribe, others
//
// Nothing is kept between requests except what the client carries: any replica with a warm child serves any
// request. The one exception is a child→client request (sampling, elicitation). A legacy child asks in the
// middle of a call and waits, so the call is held here and the client is answered `input_required`
// (basic/patterns/mrtr) with the child's request and a signed requestState naming the held call; the retry
// that carries the answers must reach this replica. The child's request does not say which call caused it,
// so on a shared child with "clientCapabilities" (the only children that ever ask) requests that could
// cause one run one at a time: the lane (below). Per-session servers keep state per session, which this
// revision has no place for, so their modern requests are refused with -32022 naming the legacy versions.

const MODERN_PROTOCOL_VERSION = '2026-07-28';
/** Keys of a request's `_meta` (spec 2026-07-28 schema RequestMetaObject). Stripped before the child sees it. */
const META_PROTOCOL_VERSION = 'io.modelcontextprotocol/protocolVersion';
const META_CLIENT_CAPABILITIES = 'io.modelcontextprotocol/clientCapabilities';
const META_CLIENT_INFO = 'io.modelcontextprotocol/clientInfo';
const META_LOG_LEVEL = 'io.modelcontextprotocol/logLevel';
const MODERN_REQUEST_META: readonly string[] = [META_PROTOCOL_VERSION, META_CLIENT_CAPABILITIES, META_CLIENT_INFO, META_LOG_LEVEL];
const META_SERVER_INFO = 'io.modelcontextprotocol/serverInfo';
const META_SUBSCRIPTION_ID = 'io.modelcontextprotocol/subscriptionId';
/** Claude's connector sends a 2026 body with this header (github.com/anthropics/claude-code/issues/93290). */
const LENIENT_HEADER_VERSION = '2025-11-25';
/** 2026-07-28 error codes (basic/index §Error Codes); each is answered with HTTP 400. */
const HEADER_MISMATCH = -32020;
const MISSING_CLIENT_CAPABILITY = -32021;
const UNSUPPORTED_PROTOCOL_VERSION = -32022;
/** 2025's "resource not found"; 2026-07-28 answers -32602 instead (server/resources §Error Handling). */
const LEGACY_RESOURCE_NOT_FOUND = -32002;

/** Methods forwarded to the child on the modern path; `Mcp-Name` must carry the named param of these three. */
const FORWARDED_METHODS: ReadonlySet<string> = new Set([
  'tools/list', 'tools/call', 'resources/list', 'resources/read', 'resources/templates/list', 'prompts/list',
  'prompts/get', 'completion/complete',
]);
const NAMED_PARAM: Readonly<Record<string, 'name' | 'uri'>> = { 'tools/call': 'name', 'resources/read': 'uri', 'prompts/get': 'name' };
/** Results that carry cache fields (server/utilities/caching): lists get the configured TTL, reads 0. */
const LIST_METHODS: ReadonlySet<string> = new Set(['tools/list', 'resources/list', 'resources/templates/list', 'prompts/list']);
/** Child capabilities that have no modern counterpart through this proxy (logs go nowhere; tasks are an extension). */
const UNBRIDGED_CAPABILITIES: readonly string[] = ['logging', 'tasks'];
/** The only requests an input_required result may carry (basic/patterns/mrtr). */
const INPUT_METHODS: ReadonlySet<string> = new Set(['sampling/createMessage', 'elicitation/create', 'roots/list']);
/**
 * A child that asks several things at once writes them one by one: what it sends within this window after
 * its first request is asked in the same round (basic/patterns/mrtr: one input_required may carry several).
 */
const INPUT_GATHER_MS = 25;
/** requestState: base64url(payload) "." base64url(HMAC-SHA256). The key file lives in the state directory. */
const REQUEST_STATE_KEY_FILE = 'request-state.key';
const REQUEST_STATE_KEY_BYTES = 32;

// Classification and validation ───────

/**
 * A request whose `_meta` claims a protocol version is modern, and so is one sent with the 2026-07-28 header
 * (it is refused for its missing claim): the SDK's inboundClassification does the same.
 */
function isModern(parsed: ParsedBody, header: string | string[] | undefined): boolean {
  if (parsed.batch || parsed.kinds[0] === 'response') return false;
  const meta = parsed.messages[0].params?._meta;
  return (isObject(meta) && META_PROTOCOL_VERSION in meta) || header === MODERN_PROTOCOL_VERSION;
}

/**
 * The modern path's entry: validate, then answer locally or forward. Every error keeps the request's id.
 * Notifications have nothing to answer on this path (cancellation is a closed stream): 202, dropped.
 */
async function handleModern(
  server: ServerRuntime, req: http.IncomingMessage, res: http.ServerResponse, msg: JsonRpcMessage, kind: MessageKind, accepts: Accepts, credential: string,
): Promise<void> {
  if (kind === 'notification') return void res.writeHead(202).end();
  const id = msg.id as JsonRpcId;
  const refused = modernRefusal(server, req, msg);
  if (refused) return reject(res, refused.status, refused.code, refused.message, {}, id, refused.data);
  const method = msg.method!;
  if (!FORWARDED_METHODS.has(method) && method !== 'server/discover' && method !== 'subscriptions/listen') {
    return reject(res, 404, METHOD_NOT_FOUND, `Method not found: ${headOf(method)} (not in protocol ${MODERN_PROTOCOL_VERSION})`, {}, id);
  }
  const up = server.shared!;
  if (up.state !== 'ready' && !(await readyWithin(up, server.proxy.limits.startWaitMs))) return unavailable(res, up, id);
  if (res.destroyed) return;
  if (method === 'server/discover') return sendJson(res, 200, resultText(id, discoverResult(up)));
  if (method === 'subscriptions/listen') return openListener(up, msg, accepts, res, credential);
  if (toolBlocked(up, msg)) {
    auditBlocked(server, credential, 'modern', msg);
    return sendJson(res, 200, errorText(id, INVALID_PARAMS, TOOL_BLOCKED));
  }
  const state = msg.params?.requestState;
  if (state !== undefined) return resumeCall(up, msg, accepts, res, credential);
  startModernCall(up, msg, accepts, res, credential);
}

type Refusal = { status: number; code: number; message: string; data?: unknown };

/**
 * Why a modern request is refused, or null: the version claimed, then the headers that must repeat the body
 * (basic/transports/streamable-http §Server Validation), then `_meta` (schema RequestMetaObject).
 */
function modernRefusal(server: ServerRuntime, req: http.IncomingMessage, msg: JsonRpcMessage): Refusal | null {
  const meta = isObject(msg.params?._meta) ? msg.params._meta : {};
  const version = meta[META_PROTOCOL_VERSION];
  if (typeof version !== 'string') return { status: 400, code: INVALID_PARAMS, message: `Invalid params: _meta["${META_PROTOCOL_VERSION}"] must be a string` };
  // A header that does not repeat the body is refused before the version is judged (the conformance suite's
  // server-stateless scenario expects -32020 for a 2026 header on an unsupported body version).
  const header = req.headers['mcp-protocol-version'];
  const lenient = header === LENIENT_HEADER_VERSION && version === MODERN_PROTOCOL_VERSION && !server.proxy.options.strictProtocolHeader;
  if (header !== version && !lenient) {
    return { status: 400, code: HEADER_MISMATCH, message: 'Header mismatch: MCP-Protocol-Version must equal the protocol version in _meta' };
  }
  if (version !== MODERN_PROTOCOL_VERSION || server.config.sessions !== 'shared') {
    // Per-session servers keep state in a session, and this revision has none: the client falls back to initialize.
    const supported = server.config.sessions === 'shared' ? [MODERN_PROTOCOL_VERSION] : [...SUPPORTED_PROTOCOL_VERSIONS];
    return { status: 400, code: UNSUPPORTED_PROTOCOL_VERSION, message: `Unsupported protocol version: ${headOf(version)}`, data: { supported, requested: version } };
  }
  const mismatch = methodHeaderMismatch(req, msg, lenient);
  if (mismatch) return { status: 400, code: HEADER_MISMATCH, message: `Header mismatch: ${mismatch}` };
  if (!isObject(meta[META_CLIENT_CAPABILITIES])) {
    return { status: 400, code: INVALID_PARAMS, message: `Invalid params: _meta["${META_CLIENT_CAPABILITIES}"] is required` };
  }
  return null;
}

/**
 * `Mcp-Method` must be the method, and `Mcp-Name` the tool, prompt or resource named (values outside visible
 * ASCII come as =?base64?…?=). A client that sent the lenient version header is a 2025 transport carrying a
 * 2026 body: it may omit them, but what it sends must still match.
 */
function methodHeaderMismatch(req: http.IncomingMessage, msg: JsonRpcMessage, lenient: boolean): string | null {
  const method = req.headers['mcp-method'];
  if (method === undefined ? !lenient : method !== msg.method) return 'Mcp-Method must equal the request method';
  const param = NAMED_PARAM[msg.method!];
  if (!param) return null;
  const named = req.headers['mcp-name'];
  if (named === undefined && lenient) return null;
  if (typeof named !== 'string' || decodeHeaderValue(named) !== msg.params?.[param]) return `Mcp-Name must equal params.${param}`;
  return null;
}

function decodeHeaderValue(value: string): string {
  const encoded = /^=\?base64\?(.*)\?=$/i.exec(value);
  return encoded ? Buffer.from(encoded[1], 'base64').toString('utf8') : value;
}

/** Waits for a starting child, at most `ms`; a request that gave up leaves no waiter behind. */
function readyWithin(up: Upstream, ms: number): Promise<boolean> {
  return new Promise((resolve) => {
    const wake = () => {
      clearTimeout(timer);
      resolve(up.state === 'ready');
    };
    const timer = setTimeout(() => {
      up.waiters = up.waiters.filter((waiter) => waiter !== wake);
      resolve(false);
    }, ms);
    timer.unref();
    up.waiters.push(wake);
  });
}

// server/discover and result stamping ───────

/** The DiscoverResult (spec 2026-07-28 server/discover), from what the child said at initialize. */
function discoverResult(up: Upstream): Record<string, unknown> {
  const init = up.initResult ?? {};
  const capabilities: Record<string, unknown> = { ...(isObject(init.capabilities) ? init.capabilities : {}) };
  for (const name of UNBRIDGED_CAPABILITIES) delete capabilities[name];
  return {
    resultType: 'complete', supportedVersions: [MODERN_PROTOCOL_VERSION], capabilities,
    ...(typeof init.instructions === 'string' ? { instructions: init.instructions } : {}),
    ...cacheFields(up, 'tools/list'),
    _meta: { [META_SERVER_INFO]: serverInfoOf(up) },
  };
}

function serverInfoOf(up: Upstream): unknown {
  return up.initResult?.serverInfo ?? { name: up.server.config.name, version: '0' };
}

/**
 * ttlMs and cacheScope (server/utilities/caching): lists and discover get the configured TTL, `public` since
 * one shared child answers every user alike; a read is per request (`private`, 0). Others carry none.
 */
function cacheFields(up: Upstream, method: string): { ttlMs: number; cacheScope: 'public' | 'private' } | Record<string, never> {
  if (LIST_METHODS.has(method)) return { ttlMs: up.server.config.listTtlMs ?? up.server.proxy.limits.listTtlMs, cacheScope: 'public' };
  if (method === 'resources/read') return { ttlMs: 0, cacheScope: 'private' };
  return {};
}

/** A child's answer, as a 2026-07-28 result: resultType, serverInfo and cache fields added; -32002 → -32602. */
function modernAnswer(up: Upstream, msg: JsonRpcMessage, method: string, id: JsonRpcId): { text: string; status: number } {
  if (msg.error !== undefined) {
    const error = isObject(msg.error) ? { ...msg.error } : { code: INTERNAL_ERROR, message: 'Invalid error from MCP server' };
    if (error.code === LEGACY_RESOURCE_NOT_FOUND) error.code = INVALID_PARAMS;
    return { text: JSON.stringify({ jsonrpc: '2.0', id, error }), status: modernStatus(error.code) };
  }
  // Stamped in place: the parsed answer is ours and is not used again (fewer copies on the hot path).
  const result = isObject(msg.result) ? msg.result : {};
  result.resultType = 'complete';
  if (LIST_METHODS.has(method) || method === 'resources/read') Object.assign(result, cacheFields(up, method));
  if (isObject(result._meta)) result._meta[META_SERVER_INFO] = serverInfoOf(up);
  else result._meta = { [META_SERVER_INFO]: serverInfoOf(up) };
  return { text: resultText(id, result), status: 200 };
}

/**
 * The same stamp as modernAnswer, spliced into the child's line instead of re-serialising its result (a
 * 100 KB result costs a JSON.stringify otherwise). Only for the two layouts serialisers write, and only when
 * the splice is exact: the answer has just jsonrpc, id and result; the result is an object without the
 * fields the stamp adds; the line names no second "id" (hasOneIdMember) and no second "result" (a parser
 * would take the last). Anything else is null, and modernAnswer re-serialises.
 */
function stampedLine(up: Upstream, msg: JsonRpcMessage, line: string, raw: Buffer | null, method: string, id: JsonRpcId): Outgoing | null {
  const result = msg.result;
  if (!isObject(result) || 'resultType' in result || '_meta' in result || 'ttlMs' in result || 'cacheScope' in result) return null;
  if (Object.keys(msg).length !== 3 || typeof msg.id !== 'number') return null;
  const childId = String(msg.id);
  const first = `{"jsonrpc":"2.0","id":${childId},"result":{`; // …result's members…}}
  const last = `},"jsonrpc":"2.0","id":${childId}}`; // {"result":{…result's members…
  let from: number;
  let to: number;
  if (line.startsWith(first) && line.endsWith('}}')) [from, to] = [first.length, line.length - 2];
  else if (line.startsWith('{"result":{') && line.endsWith(last)) [from, to] = ['{"result":{'.length, line.length - last.length];
  else return null;
  if (line.indexOf('"result":', from) !== -1 || !hasOneIdMember(line, raw)) return null;
  const cache = cacheFields(up, method);
  const head = `{"jsonrpc":"2.0","id":${JSON.stringify(id)},"result":{"resultType":"complete",` +
    ('ttlMs' in cache ? `"ttlMs":${cache.ttlMs},"cacheScope":"${cache.cacheScope}",` : '') +
    `"_meta":{${JSON.stringify(META_SERVER_INFO)}:${JSON.stringify(serverInfoOf(up))}}${to > from ? ',' : ''}`;
  // A large line goes out as the child's own bytes: the prefix and suffix cut off are ASCII, so their lengths
  // in characters are their lengths in bytes.
  if (raw && raw.length >= RAW_PASSTHROUGH_MIN_BYTES) {
    return [Buffer.from(head), raw.subarray(from, raw.length - (line.length - to)), Buffer.from('}}')];
  }
  return head + line.slice(from, to) + '}}';
}

/** HTTP status of a modern error (basic/index §Error Codes; transports: unknown method is 404). */
function modernStatus(code: unknown): number {
  if (code === METHOD_NOT_FOUND) return 404;
  return code === HEADER_MISMATCH || code === MISSING_CLIENT_CAPABILITY || code === UNSUPPORTED_PROTOCOL_VERSION ? 400 : 200;
}

// Calls ───────

/**
 * Starts a call on the shared child: a session that lives for this one request (never in a table: nothing
 * outlives the call), an exchange that answers as JSON or, when the client wants progress, as a stream of
 * that request's progress and then its answer. A closed stream or connection cancels the call on the child.
 */
function startModernCall(up: Upstream, msg: JsonRpcMessage, accepts: Accepts, res: http.ServerResponse, credential: string): void {
  const limits = up.server.proxy.limits;
  const id = msg.id as JsonRpcId;
  const inflight = up.modernInflight.get(credential) ?? 0;
  if (inflight >= limits.maxPendingPerSession) {
    return reject(res, 429, SERVER_ERROR, 'Too many requests in flight for this credential', { 'Retry-After': String(limits.retryAfterS) }, id);
  }
  const meta = msg.params!._meta as Record<string, unknown>; // modernRefusal checked it
  const session: Session = {
    id: '', server: up.server, upstream: up, transport: 'modern', credential, protocolVersion: MODERN_PROTOCOL_VERSION,
    caps: capsOf(meta[META_CLIENT_CAPABILITIES]), initialized: true, lastActiveMs: Date.now(), inflight: 0,
    stream: null, subscriptions: null, serverRequests: null, exchanges: null, closed: false,
  };
  const call: ModernCall = {
    // Only a call that may be answered input_required needs its params bound into a requestState.
    up, session, credential, method: msg.method!, digest: mayAsk(up, msg.method!) ? paramsDigest(msg.params!) : '', clientId: id, childId: -1,
    // asked is made on the first ask: most calls never ask, and a Map per call shows in the GC's share.
    exchange: null, asked: null, askScheduled: false, round: 0, continuation: null, expiry: null, lateAnswer: null, finished: false,
    offered: isObject(msg.params!.inputResponses) ? msg.params!.inputResponses : null,
  };
  session.call = call;
  up.modernInflight.set(credential, inflight + 1);
  call.exchange = modernExchange(call, accepts, res, wantsProgress(msg));
  stripModernMeta(msg);
  const entry = mayAsk(up, call.method) ? enterLane(up, {
    credential, session: null, clientId: null, exchange: null, start: () => forwardCall(call, msg),
    gone: () => call.finished || !call.exchange || call.exchange.done, drop: () => {},
  }) : 'now';
  if (entry === 'full') return finishCall(call, errorText(id, SERVER_ERROR, 'Too many requests waiting for this server; retry later'));
  if (entry === 'now') forwardCall(call, msg);
}

/** The exchange one HTTP request of a call is answered through; its close before the answer cancels the call. */
function modernExchange(call: ModernCall, accepts: Accepts, res: http.ServerResponse, progress: boolean): Exchange {
  const proxy = call.up.server.proxy;
  const exchange: Exchange = { proxy, session: call.session, heldBytes: 0, res, sse: null, remaining: 1, batch: false, answers: [], done: false };
  const onGone = () => {
    if (exchange.done) return;
    exchange.done = true;
    if (call.exchange === exchange) cancelCall(call, 'client gone');
  };
  if (accepts.sse && (!accepts.json || progress)) exchange.sse = openStream(proxy, res, {}, onGone);
  else res.on('close', onGone);
  return exchange;
}

function forwardCall(call: ModernCall, msg: JsonRpcMessage): void {
  const { up, session } = call;
  if (call.finished) return;
  if (!call.exchange || call.exchange.done) return endCall(call);
  if (up.state !== 'ready') return finishCall(call, errorText(call.clientId, SERVER_ERROR, `MCP server is ${up.state}; try again later`));
  const childId = sendRequest(session, msg, call.exchange, undefined, (answer, line, raw) => onCallAnswer(call, answer, line, raw));
  if (childId === null) return finishCall(call, errorText(call.clientId, SERVER_ERROR, NOT_ACCEPTING_INPUT));
  call.childId = childId;
}

/** The 2026 `_meta` keys are for the proxy; the child speaks 2025 and would not know them. */
function stripModernMeta(msg: JsonRpcMessage): void {
  const params = msg.params!;
  const meta = params._meta as Record<string, unknown>;
  let kept: Record<string, unknown> | null = null;
  // A null-prototype copy keeps even a "__proto__" key as the client sent it.
  for (const key in meta) if (!MODERN_REQUEST_META.includes(key)) (kept ??= Object.create(null) as Record<string, unknown>)[key] = meta[key];
  if (kept) params._meta = kept;
  else delete params._meta;
  if ('inputResponses' in params) delete params.inputResponses;
  if ('requestState' in params) delete params.requestState;
}

/**
 * The call's answer goes to the HTTP request waiting now. While none waits (the client was answered
 * input_required and has not retried yet), it is kept for the retry, and answered under the retry's id: the
 * child may answer without the input.
 */
function onCallAnswer(call: ModernCall, msg: JsonRpcMessage, line = '', raw: Buffer | null = null): void {
  if (!call.exchange && call.continuation && !call.finished) return void (call.lateAnswer = msg);
  const spliced = line ? stampedLine(call.up, msg, line, raw, call.method, call.clientId) : null;
  if (spliced) return finishCall(call, spliced);
  const { text, status } = modernAnswer(call.up, msg, call.method, call.clientId);
  finishCall(call, text, status);
}

function finishCall(call: ModernCall, text: Outgoing, status = 200): void {
  const exchange = call.exchange;
  if (!exchange || exchange.done) return endCall(call);
  endCall(call);
  if (exchange.sse || status === 200 || typeof text !== 'string') return answerExchange(exchange, text);
  exchange.done = true;
  if (!exchange.res.destroyed) sendJson(exchange.res, status, text);
}

/** The client is gone: the child is told to stop (basic/patterns/cancellation: a closed stream is a cancel). */
function cancelCall(call: ModernCall, reason: string): void {
  const pending = call.up.pending.get(call.childId);
  if (pending?.session === call.session) abortPending(call.up, call.childId, pending, reason, REQUEST_CANCELLED, 'Request cancelled');
  endCall(call);
}

/**
 * Once per call, whatever ended it: the credential's count, the held continuation and its timer, and every
 * input request of the child still unanswered (the child is told no answer will come: nothing stays open).
 */
function endCall(call: ModernCall): void {
  if (call.finished) return;
  call.finished = true;
  const { up } = call;
  const left = (up.modernInflight.get(call.credential) ?? 1) - 1;
  if (left > 0) up.modernInflight.set(call.credential, left);
  else up.modernInflight.delete(call.credential);
  if (call.expiry) clearTimeout(call.expiry);
  call.expiry = null;
  if (call.continuation) up.server.proxy.continuations.delete(call.continuation);
  call.continuation = null;
  for (const { childId } of call.asked?.values() ?? []) {
    if (!up.serverRequests.delete(childId)) continue;
    writeToChild(up, errorText(childId, INTERNAL_ERROR, 'The client request this was for has ended'));
  }
  call.asked = null;
}

/**
 * No retry came in time. The child's requests are answered with an error and the call is left to finish on
 * the child (its answer goes nowhere): cancelling it instead would leave it "maybe still running", and SDK
 * servers never answer a cancelled request, so asks on this child would be refused for ABANDONED_GRACE_MS.
 */
function expireCall(call: ModernCall): void {
  const proxy = call.up.server.proxy;
  proxy.log.info(call.up.server.config.name, `a ${call.method} waiting for its client's input was not resumed within ${proxy.limits.continuationTtlMs} ms; its requests to the client were answered with an error`);
  endCall(call);
}

// The lane ───────
//
// A shared child's sampling or elicitation request says nothing of which client request caused it. On a child
// the operator allowed to ask ("clientCapabilities"), requests that could cause one (everything but the lists)
// therefore run one at a time, legacy and modern alike: the one running holds the lane, the others wait in a
// bounded FIFO. The cost: on such a server, tool calls are serial. Servers without "clientCapabilities" never
// ask (the child was not told it could), so they have no lane and run everything concurrently.

function mayAsk(up: Upstream, method: string): boolean {
  return up.owner === null && !!up.server.config.clientCapabilities?.length && !LANE_FREE_METHODS.has(method);
}

/** Requests that never make a child ask its client. */
const LANE_FREE_METHODS: ReadonlySet<string> = new Set([...LIST_METHODS, 'resources/subscribe', 'resources/unsubscribe']);

/**
 * 'now': run it (the caller takes the lane). 'queued': it starts when the lane is free. 'full': refuse it.
 * Entries whose client has gone are dropped first, so they hold no place; one credential holds a share.
 */
function enterLane(up: Upstream, entry: LaneEntry): 'now' | 'queued' | 'full' {
  if (up.laneHolder === null && (up.laneQueue.length === 0 || up.laneGranting)) return 'now';
  const limits = up.server.proxy.limits;
  const full = () => {
    let mine = 0;
    for (const queued of up.laneQueue) if (queued.credential === entry.credential) mine++;
    return up.laneQueue.length >= limits.maxLaneQueue || mine >= limits.maxLaneQueuePerCredential;
  };
  if (full()) dropGone(up);
  if (full()) return 'full';
  up.laneQueue.push(entry);
  return 'queued';
}

/** Drops the queued requests nobody waits for any more. */
function dropGone(up: Upstream): void {
  up.laneQueue = up.laneQueue.filter((queued) => {
    if (!queued.gone()) return true;
    queued.drop();
    return false;
  });
}

/** The holder is done: after this turn (so a child that exited has its state settled), the next one starts. */
function releaseLane(up: Upstream): void {
  up.laneHolder = null;
  if (up.laneQueue.length) queueMicrotask(() => drainLane(up));
}

function drainLane(up: Upstream): void {
  while (up.laneHolder === null && up.laneQueue.length) {
    const next = up.laneQueue.shift()!;
    if (next.gone()) {
      next.drop();
      continue;
    }
    up.laneGranting = true;
    try {
      guarded(up.server.proxy, up.server.config.name, 'a queued request', next.start);
    } finally {
      up.laneGranting = false;
    }
  }
}

// Input requests (MRTR) ───────

/**
 * A child→client request while a modern call holds the lane. A capability the request did not declare gets
 * -32021 on the child's request and the call goes on (the child decides what that means). Otherwise it joins
 * this turn's round; the round is sent once the turn ends, so requests sent together are asked together.
 */
function askClient(call: ModernCall, msg: JsonRpcMessage): void {
  const { up } = call;
  const id = msg.id as JsonRpcId;
  const method = msg.method!;
  const cap = CAPABILITY_FOR_METHOD[method];
  if (call.finished) return void writeToChild(up, errorText(id, INTERNAL_ERROR, 'The client request this was for has ended'));
  if (!INPUT_METHODS.has(method) || !cap || !up.server.config.clientCapabilities?.includes(cap)) {
    return void writeToChild(up, errorText(id, METHOD_NOT_FOUND, `Client cannot take ${method}: not in this server's "clientCapabilities"`));
  }
  if (!call.session.caps[cap]) {
    const error = { code: MISSING_CLIENT_CAPABILITY, message: `Missing required client capability: ${cap}`, data: { requiredCapabilities: { [cap]: {} } } };
    return void writeToChild(up, JSON.stringify({ jsonrpc: '2.0', id, error }));
  }
  const key = String(id);
  if (call.asked?.has(key) || (call.asked?.size ?? 0) >= up.server.proxy.limits.maxServerRequestsPerChild) {
    return void writeToChild(up, errorText(id, INVALID_REQUEST, 'Duplicate or too many input requests'));
  }
  // Answers offered up front are used once each, and only when they are results (objects).
  const offered = call.offered && Object.hasOwn(call.offered, key) ? call.offered[key] : undefined;
  if (isObject(offered)) {
    delete call.offered![key];
    return void writeToChild(up, resultText(id, offered));
  }
  const params = { ...msg.params };
  delete params.elicitationId; // removed in 2026-07-28 (URL mode carries no id)
  (call.asked ??= new Map()).set(key, { childId: id, method, params });
  up.serverRequests.set(id, { session: call.session, proxyId: key });
  scheduleRound(call);
}

function scheduleRound(call: ModernCall): void {
  if (call.askScheduled) return;
  call.askScheduled = true;
  const { proxy, config } = call.up.server;
  setTimeout(() => guarded(proxy, config.name, 'an input request', () => sendRound(call)), INPUT_GATHER_MS).unref();
}

/**
 * Answers the waiting HTTP request with input_required: the child's requests, keyed by the child's own ids,
 * and a requestState that names this held call and round. The call then waits for the retry, bounded by
 * continuationTtlMs (then expireCall answers the child's requests with an error; the call keeps the lane until
 * the child answers it, or until requestTimeoutMs).
 */
function sendRound(call: ModernCall): void {
  call.askScheduled = false;
  const exchange = call.exchange;
  if (call.finished || !call.asked?.size) return;
  // Asked between rounds (the client holds the last one): it goes out with the next round, after the retry.
  if (!exchange) return;
  if (exchange.done) return cancelCall(call, 'client gone');
  const proxy = call.up.server.proxy;
  const inputRequests = Object.fromEntries([...call.asked!].map(([key, { method, params }]) => [key, { method, params }]));
  call.round++;
  if (!call.continuation) {
    call.continuation = randomBytes(16).toString('base64url');
    proxy.continuations.set(call.continuation, call);
  }
  const expiresMs = Date.now() + proxy.limits.continuationTtlMs;
  if (call.expiry) clearTimeout(call.expiry);
  call.expiry = setTimeout(() => guarded(proxy, call.up.server.config.name, 'an input request expiring', () => expireCall(call)), proxy.limits.continuationTtlMs);
  call.expiry.unref();
  const requestState = signState(proxy, { c: call.continuation, r: call.round, p: principalOf(call.credential), m: call.method, d: call.digest, e: expiresMs });
  call.exchange = null;
  const pending = call.up.pending.get(call.childId);
  if (pending) pending.exchange = null;
  const text = resultText(call.clientId, { resultType: 'input_required', inputRequests, requestState, _meta: { [META_SERVER_INFO]: serverInfoOf(call.up) } });
  if (exchange.sse) {
    exchange.remaining = 1;
    return answerExchange(exchange, text);
  }
  exchange.done = true;
  if (!exchange.res.destroyed) sendJson(exchange.res, 200, text);
}

/**
 * A retry of a call that was answered input_required. Its requestState must verify (HMAC), be unexpired, name
 * this principal, method and params, and name the round the held call waits on; anything else is -32602 and
 * touches nothing (a replayed state names a round already answered). The answers go to the child; the
 * requests it does not answer are asked again (basic/patterns/mrtr §Missing Responses).
 */
function resumeCall(up: Upstream, msg: JsonRpcMessage, accepts: Accepts, res: http.ServerResponse, credential: string): void {
  const id = msg.id as JsonRpcId;
  const params = msg.params!;
  const refuse = (why: string) => reject(res, 400, INVALID_PARAMS, `Invalid params: ${why}`, {}, id);
  const state = verifyState(up.server.proxy, params.requestState);
  if (!state) return refuse('requestState is not valid');
  if (state.e <= Date.now()) return refuse('requestState has expired');
  if (state.p !== principalOf(credential) || state.m !== msg.method || state.d !== paramsDigest(params)) {
    return refuse('requestState was issued for another request');
  }
  const call = up.server.proxy.continuations.get(state.c);
  if (!call || call.finished || call.up !== up || call.round !== state.r || call.exchange) {
    return refuse('requestState names no call waiting for input (answered already, expired, or its server restarted)');
  }
  const responses = params.inputResponses;
  if (responses !== undefined && !isObject(responses)) return refuse('inputResponses must be an object');
  call.clientId = id;
  call.exchange = modernExchange(call, accepts, res, wantsProgress(msg));
  const pending = up.pending.get(call.childId);
  if (pending) {
    pending.exchange = call.exchange;
    pending.clientId = id;
    // The child still reports progress under the call's child id; the client now knows it by the retry's token.
    const meta = params._meta;
    const token = isObject(meta) ? meta.progressToken : undefined;
    pending.clientToken = typeof token === 'string' || typeof token === 'number' ? token : undefined;
  }
  if (call.expiry) clearTimeout(call.expiry);
  call.expiry = null;
  if (call.lateAnswer) return onCallAnswer(call, call.lateAnswer);
  for (const [key, { childId }] of [...call.asked ?? []]) {
    const response = responses && Object.hasOwn(responses, key) ? responses[key] : undefined;
    if (!isObject(response)) continue;
    call.asked!.delete(key);
    up.serverRequests.delete(childId);
    writeToChild(up, resultText(childId, response));
  }
  if (call.asked?.size) scheduleRound(call);
}

type StatePayload = { c: string; r: number; p: string; m: string; d: string; e: number };

function signState(proxy: Proxy, payload: StatePayload): string {
  const body = Buffer.from(JSON.stringify(payload)).toString('base64url');
  return `${body}.${createHmac('sha256', stateKey(proxy)).update(body).digest('base64url')}`;
}

function verifyState(proxy: Proxy, value: unknown): StatePayload | null {
  if (typeof value !== 'string' || value.length > MAX_REQUEST_STATE_CHARS) return null;
  const dot = value.indexOf('.');
  if (dot === -1) return null;
  const body = value.slice(0, dot);
  const mac = Buffer.from(value.slice(dot + 1), 'base64url');
  const expected = createHmac('sha256', stateKey(proxy)).update(body).digest();
  if (mac.length !== expected.length || !timingSafeEqual(mac, expected)) return null;
  try {
    const payload = JSON.parse(Buffer.from(body, 'base64url').toString('utf8'));
    if (!isObject(payload) || typeof payload.c !== 'string' || typeof payload.r !== 'number' || typeof payload.e !== 'number') return null;
    return payload as StatePayload;
  } catch {
    return null;
  }
}

/** Who the state was issued to, without putting the credential (a token digest) in a client-visible string. */
function principalOf(credential: string): string {
  return createHash('sha256').update(`principal:${credential}`).digest('base64url').slice(0, 22);
}

/** A digest of the call's params minus what a retry adds; keys sorted, so a client's re-serialisation matches. */
function paramsDigest(params: Record<string, unknown>): string {
  const { _meta, inputResponses, requestState, ...rest } = params;
  return createHash('sha256').update(canonicalJson(rest)).digest('base64url');
}

/**
 * The HMAC key: made once and kept in the state directory (0600), so states survive a restart of the proxy
 * as bytes (the call they name does not: it is refused as unknown). Unwritable directory: a key for this run.
 */
function stateKey(proxy: Proxy): Buffer {
  if (proxy.stateKey) return proxy.stateKey;
  const path = join(proxy.options.stateDir, REQUEST_STATE_KEY_FILE);
  try {
    mkdirSync(proxy.options.stateDir, { recursive: true, mode: 0o700 });
    try {
      const fd = openSync(path, 'wx', 0o600);
      writeSync(fd, randomBytes(REQUEST_STATE_KEY_BYTES).toString('hex'));
      fsyncSync(fd);
      closeSync(fd);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const text = readBounded(path, REQUEST_STATE_KEY_BYTES * 2).trim();
    if (!/^[0-9a-f]+$/.test(text) || text.length < REQUEST_STATE_KEY_BYTES * 2) throw new ProxyError('STATE_KEY', 'the key file is not 64 hex digits');
    const key = Buffer.from(text, 'hex');
    proxy.stateKey = key;
  } catch (err) {
    proxy.log.warn('proxy', `cannot keep the requestState key in ${proxy.options.stateDir} (${(err as NodeJS.ErrnoException).code ?? describeError(err)}); using one for this run`);
    proxy.stateKey = randomBytes(REQUEST_STATE_KEY_BYTES);
  }
  return proxy.stateKey;
}

// subscriptions/listen ───────

/**
 * A listen stream (basic/patterns/subscriptions): the acknowledgement first, naming what will be honoured
 * (only what the child can send), then the matching notifications, each with the listen id in its _meta.
 * Resource subscriptions are reference-counted on the child with the legacy sessions' (section 6).
 */
function openListener(up: Upstream, msg: JsonRpcMessage, accepts: Accepts, res: http.ServerResponse, credential: string): void {
  const id = msg.id as JsonRpcId;
  const limits = up.server.proxy.limits;
  if (!accepts.sse) return reject(res, 406, SERVER_ERROR, 'Not Acceptable: subscriptions/listen answers with text/event-stream', {}, id);
  const wanted = isObject(msg.params?.notifications) ? msg.params.notifications : null;
  if (!wanted) return reject(res, 400, INVALID_PARAMS, 'Invalid params: notifications must be an object', {}, id);
  const uris = Array.isArray(wanted.resourceSubscriptions) ? wanted.resourceSubscriptions : [];
  if (uris.length > limits.maxSubscriptionsPerSession || uris.some((uri) => typeof uri !== 'string' || uri.length > limits.maxSubscriptionUriChars)) {
    return reject(res, 400, INVALID_PARAMS, 'Invalid params: too many or invalid resourceSubscriptions', {}, id);
  }
  let mine = 0;
  for (const listener of up.listeners) if (listener.credential === credential) mine++;
  if (up.listeners.size >= limits.maxSessionsPerServer || mine >= limits.maxListenersPerCredential) {
    return reject(res, 429, SERVER_ERROR, 'Too many listen streams; close one first', { 'Retry-After': String(limits.retryAfterS) }, id);
  }
  const caps = isObject(up.initResult?.capabilities) ? up.initResult.capabilities : {};
  const can = (name: string, flag: string) => isObject(caps[name]) && caps[name][flag] === true;
  const honoured: Record<string, unknown> = {};
  if (wanted.toolsListChanged === true && can('tools', 'listChanged')) honoured.toolsListChanged = true;
  if (wanted.promptsListChanged === true && can('prompts', 'listChanged')) honoured.promptsListChanged = true;
  if (wanted.resourcesListChanged === true && can('resources', 'listChanged')) honoured.resourcesListChanged = true;
  const subscribed = can('resources', 'subscribe') ? [...new Set(uris as string[])] : [];
  const added = subscribed.filter((uri) => !up.subscriptions.has(uri)).length;
  if (up.subscriptions.size + added > limits.maxSubscribedUrisPerChild) {
    return reject(res, 503, SERVER_ERROR, 'Too many resources subscribed on this server; retry later', { 'Retry-After': String(limits.retryAfterS) }, id);
  }
  if (subscribed.length) honoured.resourceSubscriptions = subscribed;
  const listener: Listener = { up, credential, id, honoured, uris: new Set(subscribed), stream: null! };
  listener.stream = openStream(up.server.proxy, res, {}, () => dropListener(listener));
  up.listeners.add(listener);
  for (const uri of listener.uris) if (holdUri(up, uri)) sendOwnRequest(up, 'resources/subscribe', { uri });
  writeEvent(listener.stream, JSON.stringify({
    jsonrpc: '2.0', method: 'notifications/subscriptions/acknowledged',
    params: { notifications: honoured, _meta: { [META_SUBSCRIPTION_ID]: id } },
  }));
}

function dropListener(listener: Listener): void {
  const up = listener.up;
  if (!up.listeners.delete(listener)) return;
  for (const uri of listener.uris) releaseSubscription(up, uri);
}

/** A child notification to every listen stream that asked for its kind (routeChildNotification calls this). */
function notifyListeners(up: Upstream, msg: JsonRpcMessage): void {
  const flag = LISTEN_FLAG[msg.method!];
  const uri = msg.method === 'notifications/resources/updated' ? msg.params?.uri : undefined;
  if (!flag && uri === undefined) return;
  for (const listener of up.listeners) {
    if (flag ? listener.honoured[flag] !== true : !listener.uris.has(uri as string)) continue;
    const params = { ...msg.params, _meta: { ...(isObject(msg.params?._meta) ? msg.params._meta : {}), [META_SUBSCRIPTION_ID]: listener.id } };
    writeEvent(listener.stream, JSON.stringify({ jsonrpc: '2.0', method: msg.method, params }));
  }
}

const LISTEN_FLAG: Readonly<Record<string, string>> = {
  'notifications/tools/list_changed': 'toolsListChanged',
  'notifications/prompts/list_changed': 'promptsListChanged',
  'notifications/resources/list_changed': 'resourcesListChanged',
};

/** Ends every listen stream of a child gracefully: the listen request's result, then the end of the stream. */
function endListeners(up: Upstream): void {
  for (const listener of [...up.listeners]) {
    writeEvent(listener.stream, resultText(listener.id, { resultType: 'complete', _meta: { [META_SUBSCRIPTION_ID]: listener.id } }));
    closeStream(listener.stream);
  }
}

// ── 9. Operator controls: tool policy, request timeouts, rate limits, audit log ─────────────────────────────────────────────────
//
// "tools" in a server's config decides which of its tools clients see and may call:
//   {"allow": [names]}   only these            {"deny": [names]}   all but these
//   {"readOnly": true}   only tools the server annotates readOnlyHint: true (spec 2025-11-25 server/tools
//                        §Tool Annotations); combines with allow or deny
// A filtered tool is removed from every tools/list answer (every transport and protocol revision: each answer
// passes routeChildResponse), and a tools/call of it is answered -32602 without reaching the child. The
// readOnly test trusts the server's own annotations, as the operator trusts the server they configured; a
// tool whose annotations the proxy has not seen yet (a call before any tools/list) is refused.

type ToolPolicy = Readonly<{ allow?: readonly string[]; deny?: readonly string[]; readOnly?: boolean }>;

const TOOL_POLICY_KEYS: ReadonlySet<string> = new Set(['allow', 'deny', 'readOnly']);
/** Fixed text: whether a tool exists behind the policy is not the client's to learn. */
const TOOL_BLOCKED = 'Tool not available: this server\'s tool policy does not allow it';

/**
 * "tools" at load: an object of allow or deny (not both: which would win?) and readOnly. An unknown key is an
 * error, not ignored: a misspelt "alow" would otherwise expose every tool.
 */
function parseToolPolicy(
  value: unknown, problem: (f: string, v: unknown, e: string) => void, error: (field: string, text: string) => void,
): ToolPolicy | undefined {
  if (value === undefined) return undefined;
  if (!isObject(value)) return problem('tools', value, 'an object with "allow" or "deny" (arrays of tool names) and/or "readOnly": true'), undefined;
  let ok = true;
  const fail = (field: string, v: unknown, e: string) => ((ok = false), problem(field, v, e));
  for (const key of Object.keys(value)) {
    if (TOOL_POLICY_KEYS.has(key)) continue;
    ok = false;
    error(`tools.${JSON.stringify(key)}`, 'unknown key; expected "allow", "deny" or "readOnly"');
  }
  const names = (key: 'allow' | 'deny') => {
    const list = value[key];
    if (list === undefined) return undefined;
    if (!Array.isArray(list) || !list.every((name) => typeof name === 'string' && name !== '')) {
      return fail(`tools.${key}`, list, 'an array of tool names (non-empty strings)'), undefined;
    }
    return Object.freeze([...list] as string[]);
  };
  const allow = names('allow');
  const deny = names('deny');
  if (allow && deny) {
    ok = false;
    error('tools', '"allow" and "deny" together; use one (with "allow", every other tool is hidden already)');
  }
  if (value.readOnly !== undefined && typeof value.readOnly !== 'boolean') fail('tools.readOnly', value.readOnly, 'a boolean');
  if (!ok) return undefined;
  return Object.freeze({ ...(allow ? { allow } : {}), ...(deny ? { deny } : {}), ...(value.readOnly ? { readOnly: true } : {}) });
}

function toolAllowed(policy: ToolPolicy, name: string, readOnlyHint: boolean | undefined): boolean {
  if (policy.allow && !policy.allow.includes(name)) return false;
  if (policy.deny?.includes(name)) return false;
  return !policy.readOnly || readOnlyHint === true;
}

/**
 * A tools/call the policy does not allow. Under a policy, a call without a string name is refused too: a
 * child that looks tools up loosely (handlers[params.name]) would run ["delete"] as "delete".
 */
function toolBlocked(up: Upstream, msg: JsonRpcMessage): boolean {
  const policy = up.server.config.tools;
  if (!policy || msg.method !== 'tools/call') return false;
  const name = isObject(msg.params) && !Array.isArray(msg.params) ? msg.params.name : undefined;
  return typeof name !== 'string' || !toolAllowed(policy, name, up.toolHints.get(name));
}

/**
 * A tools/list answer from a server with a policy: each tool's readOnlyHint is remembered (the answer to a
 * later tools/call depends on it), and the tools the policy hides are removed. True when the list changed.
 */
function filterToolList(up: Upstream, msg: JsonRpcMessage): boolean {
  const policy = up.server.config.tools;
  const result = msg.result;
  if (!policy || !isObject(result) || !Array.isArray(result.tools)) return false;
  const tools: unknown[] = result.tools;
  // A name listed twice is read-only only if every entry says so (a hostile child could list "delete" twice).
  const hints = new Map<string, boolean>();
  for (const tool of tools) {
    if (!isObject(tool) || typeof tool.name !== 'string') continue;
    hints.set(tool.name, readOnlyHintOf(tool) && hints.get(tool.name) !== false);
  }
  for (const [name, hint] of hints) {
    if (up.toolHints.size >= MAX_TOOLS_TRACKED && !up.toolHints.has(name)) break; // refreshToolHints starts afresh
    up.toolHints.set(name, hint);
  }
  const kept = tools.filter((tool) => isObject(tool) && typeof tool.name === 'string' &&
    toolAllowed(policy, tool.name, readOnlyHintOf(tool) && hints.get(tool.name) === true));
  if (kept.length === tools.length) return false;
  result.tools = kept;
  return true;
}

function readOnlyHintOf(tool: Record<string, unknown>): boolean {
  return isObject(tool.annotations) && tool.annotations.readOnlyHint === true;
}

/** Delivers a filtered list: to the call's own handler (2026-07-28, the proxy's own request) or to its client. */
function answerFiltered(pending: Pending, msg: JsonRpcMessage): void {
  if (pending.onAnswer) return pending.onAnswer(msg, '', null); // no line: stamped by re-serialising
  answerPending(pending, resultText(pending.clientId, msg.result));
}

/**
 * Learns every tool's annotations with the proxy's own tools/list, page by page (MAX_TOOL_LIST_PAGES): when the
 * child is ready and when it says its list changed, so a readOnly policy can judge a call before any client
 * has listed the tools.
 */
function refreshToolHints(up: Upstream, done: () => void = () => {}, cursor?: string, page = 1, fresh = new Map<string, boolean>()): void {
  sendOwnRequest(up, 'tools/list', cursor === undefined ? {} : { cursor }, (msg) => {
    // The list as filtered: the tools kept are read-only; those removed are as good as unknown (refused).
    const tools = isObject(msg.result) && Array.isArray(msg.result.tools) ? msg.result.tools : [];
    for (const tool of tools) if (isObject(tool) && typeof tool.name === 'string' && fresh.size < MAX_TOOLS_TRACKED) fresh.set(tool.name, true);
    const next = isObject(msg.result) ? msg.result.nextCursor : undefined;
    if (typeof next === 'string' && page < MAX_TOOL_LIST_PAGES) return refreshToolHints(up, done, next, page + 1, fresh);
    // A complete listing replaces what was known: names the server dropped are forgotten (the map stays bounded).
    if (msg.error === undefined) up.toolHints = fresh;
    done();
  });
}

// Rate limits ───────
//
// A token bucket per credential per server: it holds at most `burst` requests and refills at requestsPerMinute,
// evenly. Every JSON-RPC request in a POST takes one (notifications and responses are free); a POST that
// finds too few is refused whole, 429 with Retry-After and a JSON-RPC error, before anything reaches a child.
// Anonymous clients (no auth configured) are not limited: there is nobody to tell apart. The authorization
// endpoints have their own limits per client address (section 10).

type Bucket = { tokens: number; atMs: number };

const RATE_LIMITED_MESSAGE = 'Too many requests: this credential is over its rate limit for this server; retry later';

/** 0 when `n` requests may go now (and are taken), else the seconds until they could. */
function rateLimitWait(server: ServerRuntime, credential: string, n: number): number {
  if (credential === ANONYMOUS || n === 0) return 0;
  const { limits } = server.proxy;
  const perMinute = server.config.rateLimit?.requestsPerMinute ?? limits.requestsPerMinute;
  // A server given only a rate gets no burst above it ({"requestsPerMinute": 1} must not allow 200 at once).
  const burst = server.config.rateLimit?.burst ?? Math.min(limits.requestBurst, perMinute);
  const now = Date.now();
  const buckets = server.buckets;
  const old = buckets.get(credential);
  const bucket = old ?? { tokens: burst, atMs: now };
  // A clock stepped back refills nothing (it must not lock every credential out for the length of the step).
  bucket.tokens = Math.min(burst, bucket.tokens + (Math.max(0, now - bucket.atMs) * perMinute) / 60_000);
  bucket.atMs = now;
  buckets.delete(credential); // re-inserted last: the map is in least recently used order
  if (!old && buckets.size >= MAX_RATE_BUCKETS) buckets.delete(buckets.keys().next().value!);
  buckets.set(credential, bucket);
  // A batch larger than the burst goes when the bucket is full, into debt: refused, it could never go at all.
  if (bucket.tokens >= Math.min(n, burst)) {
    bucket.tokens -= n;
    return 0;
  }
  // More than the bucket holds can never go at once: the client is told to wait for a full bucket.
  return Math.max(1, Math.ceil(((Math.min(n, burst) - bucket.tokens) * 60) / perMinute));
}

/** Refuses a POST over its credential's rate (429); true when refused. */
function rateLimited(server: ServerRuntime, credential: string, parsed: ParsedBody, res: http.ServerResponse): boolean {
  const requests = parsed.kinds.reduce((count, kind) => count + (kind === 'request' ? 1 : 0), 0);
  const waitS = rateLimitWait(server, credential, requests);
  if (waitS === 0) return false;
  server.stats.rateLimited++;
  parsed.messages.forEach((msg, i) => {
    if (parsed.kinds[i] === 'request' && msg.method === 'tools/call') auditRefused(server, credential, msg, 'rate limited');
  });
  const id = !parsed.batch && requests === 1 ? (parsed.messages[0].id as JsonRpcId) : null;
  reject(res, 429, SERVER_ERROR, RATE_LIMITED_MESSAGE, { 'Retry-After': String(waitS) }, id);
  return true;
}

/** "rateLimit" at load: {"requestsPerMinute": N, "burst": N}, each optional, within named bounds. */
function parseRateLimit(value: unknown, problem: (f: string, v: unknown, e: string) => void): ServerConfig['rateLimit'] {
  if (value === undefined) return undefined;
  if (!isObject(value)) return problem('rateLimit', value, 'an object with "requestsPerMinute" and/or "burst"'), undefined;
  const out: { requestsPerMinute?: number; burst?: number } = {};
  for (const [key, max] of [['requestsPerMinute', MAX_REQUESTS_PER_MINUTE], ['burst', MAX_REQUEST_BURST]] as const) {
    const n = value[key];
    if (n === undefined) continue;
    if (Number.isInteger(n) && (n as number) >= 1 && (n as number) <= max) out[key] = n as number;
    else problem(`rateLimit.${key}`, n, `an integer from 1 to ${max}`);
  }
  for (const key of Object.keys(value)) if (key !== 'requestsPerMinute' && key !== 'burst') problem(`rateLimit.${key}`, key, '"requestsPerMinute" or "burst"');
  return Object.freeze(out);
}

// Audit log ───────
//
// One JSON object a line per tool call, per session opened and closed, and per OAuth grant and revocation:
// the time, the event, the credential's id ("token N" is the Nth static token, "oauth:ID" an OAuth grant,
// "anonymous"; never a token), the server, the tool, the duration and the outcome. Never arguments, results
// or session ids (a session is named by a digest). To the log (scope "audit", level info), or with
// --audit-log PATH appended to that file (created 0600), reopened on SIGUSR1 after logrotate moved it.

/** Opens the audit file for appending; a file that cannot be opened stops start-up. */
function openAuditLog(path: string): number {
  let fd: number;
  try {
    fd = openSync(path, fsConstants.O_WRONLY | fsConstants.O_APPEND | fsConstants.O_CREAT | fsConstants.O_NONBLOCK, 0o600);
  } catch (err) {
    throw new ProxyError('AUDIT_LOG', `--audit-log: cannot open ${JSON.stringify(path)} for appending (${readFailure(err)})`);
  }
  // A regular file only: writes are synchronous, and a pipe nobody reads would stall every request. And 0600
  // whoever made it (a file logrotate created 0644 before the reopen included).
  if (!fstatSync(fd).isFile()) {
    closeSync(fd);
    throw new ProxyError('AUDIT_LOG', `--audit-log: ${JSON.stringify(path)} is not a regular file`);
  }
  try {
    fchmodSync(fd, 0o600);
  } catch (err) {
    closeSync(fd);
    throw new ProxyError('AUDIT_LOG', `--audit-log: cannot make ${JSON.stringify(path)} private (0600): ${readFailure(err)}`);
  }
  return fd;
}

/** SIGUSR1: the file at the path is opened again (logrotate moved the old one); on failure the old one stays. */
function reopenAuditLog(proxy: Proxy): void {
  const path = proxy.options.auditLog;
  if (path === undefined || proxy.auditFd === null) return;
  let fd: number;
  try {
    fd = openAuditLog(path);
  } catch (err) {
    return proxy.log.error('audit', `cannot reopen ${JSON.stringify(path)} (${(err as Error).message}); still writing to the file opened before`);
  }
  closeSync(proxy.auditFd);
  proxy.auditFd = fd;
  proxy.log.info('audit', `reopened ${JSON.stringify(path)}`);
}

function audit(proxy: Proxy, fields: Record<string, unknown>): void {
  if (proxy.auditFd === null && !proxy.log.enabled('info')) return; // nowhere to go: not even built
  // Masked field by field (a secret such as "event" or "2026" must not garble the line's structure), and
  // U+2028, U+2029 and U+0085, which JSON.stringify leaves raw, escaped: some readers split lines on them.
  const masked = Object.fromEntries(Object.entries(fields).map(([key, value]) => [key, typeof value === 'string' ? maskSecrets(value, proxy.secrets) : value]));
  const line = JSON.stringify({ time: new Date().toISOString(), ...masked }).replace(/[\u2028\u2029\u0085]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  if (proxy.auditFd === null) return proxy.log.info('audit', line);
  try {
    writeSync(proxy.auditFd, `${line}\n`);
  } catch (err) {
    proxy.log.error('audit', `cannot write the audit log (${readFailure(err)}): ${line}`);
  }
}

/** A client-supplied name as the audit log shows it: a string, cut to MAX_AUDIT_NAME_CHARS. */
function auditName(name: unknown): string {
  if (typeof name !== 'string') return `(${typeName(name)})`;
  return name.length > MAX_AUDIT_NAME_CHARS ? `${name.slice(0, MAX_AUDIT_NAME_CHARS)}…` : name;
}

/** A child's answer as an outcome: "ok", "tool error" (a result with isError), or "error CODE". */
function answerOutcome(msg: JsonRpcMessage): string {
  if (msg.error !== undefined) return `error ${isObject(msg.error) && typeof msg.error.code === 'number' ? msg.error.code : '?'}`;
  return isObject(msg.result) && msg.result.isError === true ? 'tool error' : 'ok';
}

function auditToolCall(server: ServerRuntime, pending: Pending, outcome: string): void {
  const session = pending.session!;
  audit(server.proxy, {
    event: 'tool_call', credential: session.credential, server: server.config.name, tool: pending.tool,
    durationMs: Date.now() - pending.sentAtMs, outcome, transport: session.transport,
    ...(session.transport === 'modern' ? {} : { session: sessionDigest(session) }),
  });
}

/** A tools/call the tool policy refused: it never reached the child. */
function auditBlocked(server: ServerRuntime, credential: string, transport: Session['transport'], msg: JsonRpcMessage): void {
  server.stats.toolCallsBlocked++;
  auditRefused(server, credential, msg, 'blocked by the tool policy', transport);
}

function auditRefused(server: ServerRuntime, credential: string, msg: JsonRpcMessage, outcome: string, transport?: Session['transport']): void {
  audit(server.proxy, {
    event: 'tool_call', credential, server: server.config.name, tool: auditName(msg.params?.name), durationMs: 0, outcome,
    ...(transport ? { transport } : {}),
  });
}

function auditSession(session: Session, event: 'session_open' | 'session_close', why?: StopReason): void {
  audit(session.server.proxy, {
    event, credential: session.credential, server: session.server.config.name, transport: session.transport,
    session: sessionDigest(session), ...(why ? { reason: why } : {}),
  });
}

/** Names a session in the audit log without its id (whoever holds the id and the credential may use it). */
function sessionDigest(session: Session): string {
  return createHash('sha256').update(session.id).digest('hex').slice(0, AUDIT_SESSION_DIGEST_CHARS);
}

// ── 10. OAuth: metadata, registration, consent, tokens ───────────────────────────────────────────────────
//
// A built-in OAuth 2.1 authorization server (draft-ietf-oauth-v2-1), on only when the operator sets a
// passphrase (MCP_PROXY_PASSWORD) and the public URL: Claude.ai's connectors authenticate with OAuth or not at
// all, so this is how they reach servers that must not be public. The flow (spec 2025-11-25
// basic/authorization):
//   1. An MCP request without a token gets 401 with `WWW-Authenticate: Bearer resource_metadata="<URL>"`.
//   2. The client reads that endpoint's protected resource metadata (RFC 9728; `resource` is exactly the
//      endpoint's URL), then the authorization server metadata (RFC 8414) of the issuer: the public URL's
//      origin, with no path (Claude.ai looks only there: github.com/anthropics/claude-ai-mcp/issues/82).
//   3. It registers (RFC 7591; Claude.ai does so on every new connection) and sends the user to /authorize
//      with PKCE S256 (RFC 7636) and `resource` (RFC 8707).
//   4. The operator sees who asks for what, types the passphrase and approves; the client gets a code.
//   5. /token trades the code and its verifier for an access token bound to that one server, and a refresh
//      token that rotates on every use.
// Tokens and client secrets are random strings of which only the SHA-256 is kept, in memory and in the state
// file (0600, written atomically). Every map here is bounded (section 1) and swept with the sessions.

type ClientAuthMethod = 'none' | 'client_secret_post' | 'client_secret_basic';
const CLIENT_AUTH_METHODS: readonly ClientAuthMethod[] = ['client_secret_post', 'client_secret_basic', 'none'];

/** A registered client. Persisted. */
type OAuthClient = {
  id: string;
  /** SHA-256 (hex) of its secret; null for a public client (token_endpoint_auth_method "none"). */
  secretHash: string | null;
  name: string;
  redirectUris: string[];
  authMethod: ClientAuthMethod;
  createdAtMs: number;
  /** Pre-registered by the operator (--oauth-client-id): never evicted, never written to the state file. */
  preRegistered?: boolean;
  /** A client ID metadata document's client: when it was fetched (it is fetched again after CIMD_CACHE_MS). */
  fetchedAtMs?: number;
};

/** Where Claude.ai's hosted surfaces send the browser back (Claude's connector docs: auth_callback). */
const CLAUDE_CALLBACKS: readonly string[] = ['https://claude.ai/api/mcp/auth_callback', 'https://claude.com/api/mcp/auth_callback'];
/** …and Claude Code (RFC 8252 loopback; any port). */
const LOOPBACK_CALLBACKS: readonly string[] = ['http://localhost/callback', 'http://127.0.0.1/callback'];

/** What the operator approved: one client, one server (or every server, "*"), with its current tokens. Persisted. */
type Grant = {
  id: string;
  clientId: string;
  audience: string;
  /** Access tokens still valid, the newest few, each until its own expiry: a refresh cuts off no request. */
  access: { hash: string; expiresMs: number }[];
  /**
   * Refresh tokens issued and not yet used: one, or a few when the previous token was presented again (an
   * answer lost on the way, or two refreshes at once). The first of them to be used retires the others.
   */
  refreshHashes: string[];
  /** The token they were issued for: valid until one of them is first used. */
  previousRefreshHash: string | null;
  /** Refresh tokens rotated out: presenting one again means it leaked, and the grant is revoked. */
  retiredRefreshHashes: string[];
  refreshExpiresMs: number;
  createdAtMs: number;
};

/** An authorization request shown on the consent page, waiting for the operator; keyed by its CSRF token. */
type PendingConsent = {
  clientId: string;
  redirectUri: string;
  state: string;
  codeChallenge: string;
  /** A server name, or "*" when the request named no resource (then the grant covers every server). */
  audience: string;
  resource: string | undefined;
  expiresMs: number;
};

/** An authorization code; after its one exchange, kept until it expires to catch a replay (RFC 6749 §4.1.2). */
type AuthCode = Omit<PendingConsent, 'state' | 'expiresMs'> & { expiresMs: number; grantId: string | null };

/** A fixed-window counter per client address (registrations, wrong passphrases). */
type Window = { count: number; startMs: number };

type OAuth = {
  /** The public URL's origin; every endpoint below lives at its root. */
  issuer: string;
  publicUrl: URL;
  /** Host routes: {server}.{baseDomain} serves that server at /mcp and /sse. */
  baseDomain: string | undefined;
  checkPassphrase: (candidate: string) => boolean;
  statePath: string;
  maxStateBytes: number;
  log: Logger;
  /** Writes an audit event (section 9); set by startProxy. */
  audit: (fields: Record<string, unknown>) => void;
  metadataHosts: ReadonlySet<string>;
  fetchMetadata: MetadataFetcher;
  metadataFetches: number;
  metadataFailures: Map<string, { atMs: number; why: string }>;
  clients: Map<string, OAuthClient>;
  grants: Map<string, Grant>;
  /** Token hash → grant, for access tokens and live refresh tokens. */
  byAccess: Map<string, Grant>;
  byRefresh: Map<string, Grant>;
  byRetired: Map<string, Grant>;
  consents: Map<string, PendingConsent>;
  codes: Map<string, AuthCode>;
  registrations: Map<string, Window>;
  consentPages: Map<string, Window>;
  /** Token and revocation requests per client address per minute (limits.tokenRequestsPerMinute). */
  tokenRequests: Map<string, Window>;
  failures: Map<string, Window>;
};

/** Fetches a client ID metadata document; replaceable only by tests (the real one guards against SSRF). */
export type MetadataFetcher = (url: URL) => Promise<unknown>;

type OAuthSettings = {
  publicUrl: string; baseDomain: string | undefined; passphrase: string; stateDir: string;
  /** Hosts whose client ID metadata documents may be fetched; empty: the feature is off. */
  metadataHosts: readonly string[];
  fetchMetadata: MetadataFetcher;
  /** A client the operator registered by hand, for Claude.ai's "OAuth Client ID / Secret" fields. */
  preRegistered: { id: string; secret: string } | undefined;
};

/** `scrypt$N$r$p$salt$hash` (base64url), as `hash-password` prints it; anything else is the passphrase itself. */
const SCRYPT_PREFIX = 'scrypt$';
const SCRYPT_PARAMS = { N: 16384, r: 8, p: 1 } as const;
const SCRYPT_KEY_BYTES = 32;
const STATE_FILE = 'oauth-state.json';
const STATE_VERSION = 2;
const TOKEN_BYTES = 32;
/** RFC 7636 §4.1: the verifier's alphabet and length; §4.2: an S256 challenge is 43 base64url characters. */
const PKCE_VERIFIER_RE = /^[A-Za-z0-9._~-]{43,128}$/;
const PKCE_CHALLENGE_RE = /^[A-Za-z0-9_-]{43}$/;
/** A client's stored metadata stays small (about 3 KB at most), so maxOAuthGrants clients fit the state file. */
const MAX_CLIENT_NAME_CHARS = 100;
const MAX_REDIRECT_URIS = 5;
const MAX_REDIRECT_URI_CHARS = 512;
const MAX_RETIRED_REFRESH_TOKENS = 8;
/** Successors one refresh token may get before one of them is used (lost answers, concurrent refreshes). */
const MAX_REFRESH_SUCCESSORS = 4;
/** Access tokens of one grant valid at once (each refresh adds one; each expires on its own). */
const MAX_ACCESS_TOKENS = 4;

function hashToken(token: string): string {
  return sha256(token).toString('hex');
}

function newToken(): string {
  return randomBytes(TOKEN_BYTES).toString('base64url');
}

function equalHex(a: string, b: string): boolean {
  return a.length === b.length && timingSafeEqual(Buffer.from(a), Buffer.from(b));
}

// Setup and state file ───────

/**
 * Turns the operator's settings into the running authorization server, or throws an operator error naming
 * what to set. The state file is loaded (or created) here, so an unwritable state directory stops start-up.
 */
function createOAuth(settings: OAuthSettings, log: Logger, limits: Limits): OAuth {
  const publicUrl = parsePublicUrl(settings.publicUrl);
  const statePath = join(settings.stateDir, STATE_FILE);
  const oauth: OAuth = {
    issuer: publicUrl.origin, publicUrl, baseDomain: settings.baseDomain,
    checkPassphrase: passphraseChecker(settings.passphrase), statePath, maxStateBytes: limits.maxStateFileBytes, log, audit: () => {},
    metadataHosts: new Set(settings.metadataHosts.map((host) => host.toLowerCase())), fetchMetadata: settings.fetchMetadata,
    metadataFetches: 0, metadataFailures: new Map(),
    clients: new Map(), grants: new Map(), byAccess: new Map(), byRefresh: new Map(), byRetired: new Map(),
    consents: new Map(), codes: new Map(), registrations: new Map(), consentPages: new Map(), tokenRequests: new Map(), failures: new Map(),
  };
  try {
    mkdirSync(settings.stateDir, { recursive: true, mode: 0o700 });
  } catch (err) {
    throw new ProxyError('STATE_DIR', `cannot create the state directory ${JSON.stringify(settings.stateDir)} (${(err as NodeJS.ErrnoException).code ?? 'error'}); set --state-dir (MCP_PROXY_STATE_DIR) to a writable directory`);
  }
  // Before loading: grants of the pre-registered client are kept only if their client is known.
  if (settings.preRegistered) {
    const { id, secret } = settings.preRegistered;
    oauth.clients.set(id, {
      id, secretHash: hashToken(secret), name: `${id} (pre-registered)`, redirectUris: [...CLAUDE_CALLBACKS, ...LOOPBACK_CALLBACKS],
      authMethod: 'client_secret_post', createdAtMs: Date.now(), preRegistered: true,
    });
  }
  loadState(oauth, log, limits);
  saveState(oauth); // proves the directory is writable now, not at the first login
  if ((statSync(settings.stateDir).mode & 0o022) !== 0) {
    log.warn('oauth', `the state directory ${settings.stateDir} is writable by other users; make it 0700 (it holds token hashes)`);
  }
  return oauth;
}

/** The public URL: https, or http on a loopback host (for trying it locally); an origin, no path or query. */
function parsePublicUrl(text: string): URL {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new ProxyError('PUBLIC_URL', `--public-url: got ${JSON.stringify(text)}, expected a URL such as https://mcp.example.com`);
  }
  const loopback = LOOPBACK_HOSTNAMES.has(url.hostname);
  if (url.protocol !== 'https:' && !(url.protocol === 'http:' && loopback)) {
    throw new ProxyError('PUBLIC_URL', `--public-url: got ${JSON.stringify(text)}, expected https:// (Claude.ai connects only over HTTPS on port 443)`);
  }
  if ((url.pathname !== '/' && url.pathname !== '') || url.search || url.hash || url.username || url.password) {
    throw new ProxyError('PUBLIC_URL', `--public-url: got ${JSON.stringify(text)}, expected an origin with no path (the issuer must be at the root)`);
  }
  return url;
}

/**
 * Constant-time passphrase check. A plain passphrase is compared by SHA-256 digest (so lengths do not leak);
 * an scrypt hash (`hash-password`) keeps the passphrase itself out of the environment.
 */
function passphraseChecker(configured: string): (candidate: string) => boolean {
  if (!configured.startsWith(SCRYPT_PREFIX)) {
    const digest = sha256(configured);
    return (candidate) => timingSafeEqual(sha256(candidate), digest);
  }
  const [, n, r, p, salt, hash] = configured.split('$');
  const params = { N: Number(n), r: Number(r), p: Number(p), maxmem: 256 * MIB };
  const expected = Buffer.from(hash ?? '', 'base64url');
  if (!(params.N > 1 && params.r > 0 && params.p > 0) || expected.length !== SCRYPT_KEY_BYTES || !salt) {
    throw new ProxyError('PASSPHRASE', `MCP_PROXY_PASSWORD: an scrypt hash must look like ${SCRYPT_PREFIX}N$r$p$salt$hash (run \`node dist/proxy.js hash-password\`)`);
  }
  return (candidate) => timingSafeEqual(scryptSync(candidate, Buffer.from(salt, 'base64url'), SCRYPT_KEY_BYTES, params), expected);
}

/** `hash-password`: the scrypt form of a passphrase, for MCP_PROXY_PASSWORD. */
export function hashPassphrase(passphrase: string): string {
  const salt = randomBytes(16);
  const key = scryptSync(passphrase, salt, SCRYPT_KEY_BYTES, SCRYPT_PARAMS);
  return [SCRYPT_PREFIX.slice(0, -1), SCRYPT_PARAMS.N, SCRYPT_PARAMS.r, SCRYPT_PARAMS.p, salt.toString('base64url'), key.toString('base64url')].join('$');
}

/**
 * Loads clients and grants. A missing file is a first start; a corrupt one is reported and moved aside (never
 * silently emptied: the operator may want it back), and the proxy starts with no grants.
 */
function loadState(oauth: OAuth, log: Logger, limits: Limits): void {
  let text: string;
  try {
    text = readBounded(oauth.statePath, limits.maxStateFileBytes);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    return moveAside(oauth, log, readFailure(err));
  }
  let state: unknown;
  try {
    state = JSON.parse(text);
  } catch {
    return moveAside(oauth, log, 'not valid JSON');
  }
  if (isObject(state) && state.version === 1 && Array.isArray(state.grants)) state = { ...state, version: 2, grants: state.grants.map(grantFromVersion1) };
  if (!isObject(state) || state.version !== STATE_VERSION || !Array.isArray(state.clients) || !Array.isArray(state.grants)) {
    return moveAside(oauth, log, `not a version ${STATE_VERSION} state file`);
  }
  const clients = state.clients as unknown[];
  const grants = state.grants as unknown[];
  if (!clients.every(isStoredClient) || !grants.every(isStoredGrant)) return moveAside(oauth, log, 'holds a malformed client or grant');
  for (const client of clients) if (!oauth.clients.has(client.id)) oauth.clients.set(client.id, client);
  for (const grant of grants) if (oauth.clients.has(grant.clientId)) indexGrant(oauth, grant);
  log.info('oauth', `loaded ${oauth.clients.size} clients and ${oauth.grants.size} grants from ${oauth.statePath}`);
}

const HASH_RE = /^[0-9a-f]{64}$/;

/** Version 1 kept one access token and one newest refresh token per grant; version 2 keeps lists of them. */
function grantFromVersion1(grant: unknown): unknown {
  if (!isObject(grant) || typeof grant.accessHash !== 'string' || typeof grant.refreshHash !== 'string') return grant;
  const { accessHash, accessExpiresMs, refreshHash, ...rest } = grant;
  return { ...rest, access: [{ hash: accessHash, expiresMs: accessExpiresMs }], refreshHashes: [refreshHash] };
}

function isStoredClient(value: unknown): value is OAuthClient {
  return isObject(value) && typeof value.id === 'string' && (value.secretHash === null || (typeof value.secretHash === 'string' && HASH_RE.test(value.secretHash))) &&
    typeof value.name === 'string' && Array.isArray(value.redirectUris) && value.redirectUris.every((uri) => typeof uri === 'string') &&
    CLIENT_AUTH_METHODS.includes(value.authMethod as ClientAuthMethod) && Number.isFinite(value.createdAtMs);
}

function isStoredGrant(value: unknown): value is Grant {
  const hashes = (list: unknown) => Array.isArray(list) && list.every((hash) => typeof hash === 'string' && HASH_RE.test(hash));
  return isObject(value) && typeof value.id === 'string' && typeof value.clientId === 'string' && typeof value.audience === 'string' &&
    Array.isArray(value.access) && value.access.every((a) => isObject(a) && typeof a.hash === 'string' && HASH_RE.test(a.hash) && Number.isFinite(a.expiresMs)) &&
    hashes(value.refreshHashes) && hashes(value.retiredRefreshHashes) &&
    (value.previousRefreshHash === null || (typeof value.previousRefreshHash === 'string' && HASH_RE.test(value.previousRefreshHash))) &&
    Number.isFinite(value.refreshExpiresMs) && Number.isFinite(value.createdAtMs);
}

function moveAside(oauth: OAuth, log: Logger, why: string): void {
  const aside = `${oauth.statePath}.corrupt-${Date.now()}`;
  try {
    renameSync(oauth.statePath, aside);
  } catch (err) {
    throw new ProxyError('STATE_FILE', `${oauth.statePath}: ${why}, and it cannot be moved aside (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  log.error('oauth', `${oauth.statePath}: ${why}; moved it to ${aside} and started with no grants (clients must log in again)`);
}

/**
 * Atomic: a temporary file, fsync'd, renamed over the old one; mode 0600 (it holds token hashes). Only clients
 * that hold a grant are written: a registration alone costs no write (anyone may register, Claude.ai on every
 * connection), and one lost in a restart just registers again. So the file holds at most maxOAuthGrants
 * grants and their clients, each a few KB; it is refused rather than written past maxStateFileBytes.
 */
function saveState(oauth: OAuth): void {
  const granted = new Set([...oauth.grants.values()].map((grant) => grant.clientId));
  const clients = [...oauth.clients.values()].filter((client) => !client.preRegistered && granted.has(client.id));
  const text = JSON.stringify({ version: STATE_VERSION, clients, grants: [...oauth.grants.values()] });
  if (Buffer.byteLength(text) > oauth.maxStateBytes) {
    oauth.log.error('oauth', `state not saved: it would be larger than ${oauth.maxStateBytes} bytes (maxStateFileBytes); grants since the last save are lost on restart`);
    return;
  }
  // A fresh name, created exclusively ('wx' fails on anything already there, a symlink included) with mode
  // 0600 from the start: nothing planted in the directory can redirect or widen the write.
  const temporary = `${oauth.statePath}.${randomBytes(8).toString('hex')}.tmp`;
  const fd = openSync(temporary, 'wx', 0o600);
  try {
    writeSync(fd, text);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(temporary, oauth.statePath);
}

function indexGrant(oauth: OAuth, grant: Grant): void {
  oauth.grants.set(grant.id, grant);
  for (const access of grant.access) oauth.byAccess.set(access.hash, grant);
  for (const hash of grant.refreshHashes) oauth.byRefresh.set(hash, grant);
  if (grant.previousRefreshHash) oauth.byRefresh.set(grant.previousRefreshHash, grant);
  for (const retired of grant.retiredRefreshHashes) oauth.byRetired.set(retired, grant);
}

/** Removes a grant's tokens from the lookups (to change them, or to revoke it). */
function unindexGrant(oauth: OAuth, grant: Grant): void {
  for (const access of grant.access) oauth.byAccess.delete(access.hash);
  for (const hash of grant.refreshHashes) oauth.byRefresh.delete(hash);
  if (grant.previousRefreshHash) oauth.byRefresh.delete(grant.previousRefreshHash);
  for (const retired of grant.retiredRefreshHashes) oauth.byRetired.delete(retired);
}

function revokeGrant(oauth: OAuth, grant: Grant, why: string): void {
  oauth.grants.delete(grant.id);
  unindexGrant(oauth, grant);
  oauth.audit({ event: 'revoke', credential: `oauth:${grant.id}`, audience: grant.audience, reason: why });
}

// Routes and metadata ───────

/** One MCP endpoint as a client addresses it: which server, which leaf, and the path prefix before the leaf. */
type Route = { server: ServerRuntime; leaf: string; prefix: string; hostRoute: boolean };

/**
 * The one place that maps (Host, path) to a server: /{name}/{leaf} always; /{leaf} on {name}.{baseDomain}
 * (host routes); /{leaf} at the root when only one server is configured. Claude.ai has been reported to
 * fail after OAuth on endpoints whose path is not just /mcp (github.com/anthropics/claude-ai-mcp/issues/214).
 */
function routeOf(proxy: Proxy, host: string | undefined, path: string): Route | null {
  const parts = path.split('/');
  if (parts.length === 3 && parts[1].length <= MAX_SEGMENT_CHARS) {
    const server = proxy.servers.get(parts[1].toLowerCase());
    return server ? { server, leaf: parts[2], prefix: `/${parts[1]}`, hostRoute: false } : null;
  }
  if (parts.length !== 2) return null;
  const hosted = hostServer(proxy, host);
  if (hosted) return { server: hosted, leaf: parts[1], prefix: '', hostRoute: true };
  const root = rootServer(proxy);
  if (root && !isServerHost(proxy, host)) return { server: root, leaf: parts[1], prefix: '', hostRoute: false };
  return null;
}

/**
 * The server /mcp and /sse serve: the only server at start, kept while that server (by name) is configured,
 * so a reload that adds a second server does not take the root URL from the clients using it, nor ever hand
 * it to another server while its own is there (claude-ai-mcp#214: Claude.ai users paste a bare /mcp).
 */
function rootServer(proxy: Proxy): ServerRuntime | undefined {
  if (proxy.rootName === null) return undefined;
  const server = proxy.servers.get(serverSegment(proxy.rootName));
  return server?.config.name === proxy.rootName ? server : undefined;
}

/** The server a Host names as {name}.{baseDomain}, if host routes are on. */
function hostServer(proxy: Proxy, host: string | undefined): ServerRuntime | undefined {
  const label = host === undefined ? null : subdomainLabel(proxy, hostnameOf(host));
  return label === null ? undefined : proxy.servers.get(label);
}

function isServerHost(proxy: Proxy, host: string | undefined): boolean {
  return host !== undefined && subdomainLabel(proxy, hostnameOf(host)) !== null;
}

/** The origin a route is served on: the public URL's, or {name}.{baseDomain} with its scheme and port. */
function routeOrigin(oauth: OAuth, route: Route): string {
  if (!route.hostRoute) return oauth.issuer;
  const { protocol, port } = oauth.publicUrl;
  return `${protocol}//${route.server.segment}.${oauth.baseDomain}${port ? `:${port}` : ''}`;
}

/** The endpoint's own URL: a token's `resource` must name exactly this (RFC 9728 §3.3, RFC 8707). */
function resourceUrl(oauth: OAuth, route: Route): string {
  return `${routeOrigin(oauth, route)}${route.prefix}/${route.leaf}`;
}

/**
 * Where the endpoint's protected resource metadata is: the well-known path inserted before its path (§3.1).
 * A legacy POST to /messages belongs to its /sse endpoint: its 401 names that one's metadata, or a client
 * refreshing a token there finds none and starts over with a new consent.
 */
function metadataUrl(oauth: OAuth, route: Route): string {
  const leaf = route.leaf === 'messages' ? 'sse' : route.leaf;
  return `${routeOrigin(oauth, route)}/.well-known/oauth-protected-resource${route.prefix}/${leaf}`;
}

/** The server a `resource` parameter names (exactly one of our endpoint URLs), or null. */
function audienceOf(proxy: Proxy, oauth: OAuth, resource: string): string | null {
  let url: URL;
  try {
    url = new URL(resource);
  } catch {
    return null;
  }
  const route = routeOf(proxy, url.host, url.pathname);
  if (!route || !MCP_LEAVES.has(route.leaf)) return null;
  // Exactly the endpoint's URL, as written (RFC 8707 §2): only the scheme and host may differ in case. The
  // URL parser would also accept backslashes, userinfo, dot segments and a query; the text comparison does not.
  const pathAt = resource.indexOf('/', resource.indexOf('//') + 2);
  const written = pathAt === -1 ? resource.toLowerCase() : resource.slice(0, pathAt).toLowerCase() + resource.slice(pathAt);
  return written === resourceUrl(oauth, route) ? route.server.config.name : null;
}

const MCP_LEAVES: ReadonlySet<string> = new Set(['mcp', 'sse']);

/** RFC 9728 documents, at /.well-known/oauth-protected-resource{endpoint path}, and at the root. */
function protectedResourceMetadata(proxy: Proxy, oauth: OAuth, host: string | undefined, rest: string, res: http.ServerResponse): void {
  // The root document names the root route's endpoint (one server, or a host route); with several servers at
  // the root there is no one resource to name, and clients use the endpoint's own document anyway.
  const route = rest === '' ? routeOf(proxy, host, '/mcp') : routeOf(proxy, host, rest);
  if (!route || !MCP_LEAVES.has(route.leaf)) return reject(res, 404, SERVER_ERROR, 'Not Found');
  const body = {
    resource: resourceUrl(oauth, route),
    authorization_servers: [oauth.issuer],
    bearer_methods_supported: ['header'],
    resource_name: route.server.config.name,
  };
  sendJson(res, 200, JSON.stringify(body), { 'Cache-Control': 'no-store' });
}

/** RFC 8414 metadata: exactly what is implemented. */
function authorizationServerMetadata(oauth: OAuth, res: http.ServerResponse): void {
  const at = (path: string) => `${oauth.issuer}${path}`;
  sendJson(res, 200, JSON.stringify({
    issuer: oauth.issuer,
    authorization_endpoint: at('/authorize'),
    token_endpoint: at('/token'),
    registration_endpoint: at('/register'),
    revocation_endpoint: at('/revoke'),
    response_types_supported: ['code'],
    response_modes_supported: ['query'],
    grant_types_supported: ['authorization_code', 'refresh_token'],
    code_challenge_methods_supported: ['S256'],
    token_endpoint_auth_methods_supported: CLIENT_AUTH_METHODS,
    revocation_endpoint_auth_methods_supported: CLIENT_AUTH_METHODS,
    authorization_response_iss_parameter_supported: true,
    ...(oauth.metadataHosts.size ? { client_id_metadata_document_supported: true } : {}),
  }), { 'Cache-Control': 'no-store' });
}

/**
 * The bearer challenge of an MCP endpoint (RFC 9728 §5.1, RFC 6750 §3): no `error` when no token was sent;
 * `invalid_token` for a bad one. Without OAuth there is no metadata to point at: the realm alone.
 */
function bearerChallenge(proxy: Proxy, route: Route | null, failure: 'missing' | 'invalid'): string {
  const error = failure === 'invalid' ? ', error="invalid_token"' : '';
  if (!proxy.oauth || !route) return `Bearer realm="${PROXY_NAME}"${error}`;
  return `Bearer resource_metadata="${metadataUrl(proxy.oauth, route)}"${error}`;
}

// Client registration (RFC 7591) ───────

async function handleRegister(proxy: Proxy, oauth: OAuth, req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
  if (req.method !== 'POST') return oauthError(res, 405, 'invalid_request', 'POST a JSON client metadata document', { Allow: 'POST' });
  if (!countWindow(oauth.registrations, clientAddress(proxy, req), proxy.limits.registrationsPerMinute, 60_000, proxy.limits)) {
    return oauthError(res, 429, 'slow_down', 'Too many registrations; retry later', { 'Retry-After': '60' });
  }
  const body = await readFormOrJson(proxy, req, res);
  if (body === null) return;
  let metadata: unknown;
  try {
    metadata = JSON.parse(body);
  } catch {
    return oauthError(res, 400, 'invalid_client_metadata', 'Body must be a JSON object');
  }
  const parsed = parseClientMetadata(metadata);
  if (typeof parsed === 'string') return oauthError(res, 400, parsed.startsWith('redirect') ? 'invalid_redirect_uri' : 'invalid_client_metadata', parsed);
  if (oauth.clients.size >= proxy.limits.maxOAuthClients && !evictUnusedClient(oauth)) {
    return oauthError(res, 503, 'temporarily_unavailable', 'Too many registered clients', { 'Retry-After': String(proxy.limits.retryAfterS) });
  }
  const secret = parsed.authMethod === 'none' ? null : newToken();
  const client: OAuthClient = { id: newToken(), secretHash: secret && hashToken(secret), createdAtMs: Date.now(), ...parsed };
  oauth.clients.set(client.id, client); // written to the state file once it holds a grant (saveState)
  proxy.log.info('oauth', `registered client ${client.id.slice(0, 8)}… (${JSON.stringify(client.name)}, ${client.authMethod})`);
  sendJson(res, 201, JSON.stringify({
    client_id: client.id, ...(secret ? { client_secret: secret, client_secret_expires_at: 0 } : {}),
    client_id_issued_at: Math.floor(client.createdAtMs / 1000), client_name: client.name, redirect_uris: client.redirectUris,
    token_endpoint_auth_method: client.authMethod, grant_types: ['authorization_code', 'refresh_token'], response_types: ['code'],
  }), { 'Cache-Control': 'no-store' });
}

type ClientMetadata = Pick<OAuthClient, 'name' | 'redirectUris' | 'authMethod'>;

/** Validated client metadata, or why not. An omitted auth method means client_secret_basic (RFC 7591 §2). */
function parseClientMetadata(metadata: unknown): ClientMetadata | string {
  if (!isObject(metadata)) return 'Body must be a JSON object';
  const uris = metadata.redirect_uris;
  if (!Array.isArray(uris) || uris.length === 0 || uris.length > MAX_REDIRECT_URIS) return `redirect_uris must list 1 to ${MAX_REDIRECT_URIS} URIs`;
  for (const uri of uris) if (!validRedirectUri(uri)) return 'redirect_uris: each must be https, or http on a loopback address, in visible ASCII (percent-encoded), with no fragment';
  const authMethod = metadata.token_endpoint_auth_method ?? 'client_secret_basic';
  if (!CLIENT_AUTH_METHODS.includes(authMethod as ClientAuthMethod)) return `token_endpoint_auth_method must be one of ${CLIENT_AUTH_METHODS.join(', ')}`;
  const grants = metadata.grant_types ?? ['authorization_code'];
  if (!Array.isArray(grants) || grants.some((g) => g !== 'authorization_code' && g !== 'refresh_token')) return 'grant_types may hold only authorization_code and refresh_token';
  const responses = metadata.response_types ?? ['code'];
  if (!Array.isArray(responses) || responses.some((r) => r !== 'code')) return 'response_types may hold only code';
  const rawName = typeof metadata.client_name === 'string' ? metadata.client_name : 'unnamed client';
  const name = escapeControl(rawName).slice(0, MAX_CLIENT_NAME_CHARS);
  return { name, redirectUris: uris as string[], authMethod: authMethod as ClientAuthMethod };
}

/** https anywhere, or http on a loopback address (RFC 8252 §7.3: native apps); never a fragment. */
function validRedirectUri(uri: unknown): boolean {
  // Visible ASCII only (anything else must be percent-encoded, RFC 3986): a control character would pass the
  // URL parser mid-path and take six bytes in the state file, past the per-client bound.
  if (typeof uri !== 'string' || uri.length > MAX_REDIRECT_URI_CHARS || !/^[\x21-\x7e]+$/.test(uri)) return false;
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    return false;
  }
  if (url.hash || url.username || url.password) return false;
  return url.protocol === 'https:' || (url.protocol === 'http:' && LOOPBACK_HOSTNAMES.has(url.hostname));
}

/**
 * Exact match against a registered URI (spec basic/authorization §Redirect URI validation), except that a
 * loopback http URI may use any port (RFC 8252 §7.3; Claude Code registers http://localhost/callback).
 */
function redirectMatches(client: OAuthClient, uri: string): boolean {
  if (client.redirectUris.includes(uri)) return true;
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    return false;
  }
  if (url.protocol !== 'http:' || !LOOPBACK_HOSTNAMES.has(url.hostname)) return false;
  url.port = '';
  return client.redirectUris.some((registered) => {
    const candidate = new URL(registered);
    candidate.port = '';
    return candidate.href === url.href;
  });
}

/** At the cap, the oldest client that holds no grant gives way (Claude.ai registers on every connection). */
function evictUnusedClient(oauth: OAuth): boolean {
  // Never one with a grant, an approval form open or a code to exchange: that is someone mid-login.
  const busy = new Set([...oauth.grants.values(), ...oauth.consents.values(), ...oauth.codes.values()].map((entry) => entry.clientId));
  for (const client of oauth.clients.values()) {
    if (busy.has(client.id) || client.preRegistered) continue;
    oauth.clients.delete(client.id);
    return true;
  }
  return false;
}

// Consent (/authorize) ───────

/**
 * GET shows the consent page for a valid request; POST is the operator's answer. Until the client and the
 * redirect URI are known good, errors are shown on the page, never redirected (RFC 6749 §4.1.2.1): an
 * attacker must not be able to bounce the browser anywhere through us.
 */
async function handleAuthorize(proxy: Proxy, oauth: OAuth, req: http.IncomingMessage, res: http.ServerResponse, query: string): Promise<void> {
  if (req.method === 'GET') {
    if (!countWindow(oauth.consentPages, clientAddress(proxy, req), proxy.limits.consentPagesPerMinute, 60_000, proxy.limits)) {
      return consentPage(res, 429, errorPage('Too many authorization requests from your address. Wait a minute.'), undefined, { 'Retry-After': '60' });
    }
    return showConsent(proxy, oauth, new URLSearchParams(query), res);
  }
  if (req.method !== 'POST') return consentPage(res, 405, errorPage('This page takes GET and POST only.'));
  const body = await readFormOrJson(proxy, req, res);
  if (body === null) return;
  return answerConsent(proxy, oauth, req, new URLSearchParams(body), res);
}

async function showConsent(proxy: Proxy, oauth: OAuth, params: URLSearchParams, res: http.ServerResponse): Promise<void> {
  const clientId = params.get('client_id') ?? '';
  const client = isMetadataUrl(oauth, clientId) ? await metadataClient(proxy, oauth, clientId) : oauth.clients.get(clientId);
  if (typeof client === 'string') return consentPage(res, 400, errorPage(client));
  if (!client) return consentPage(res, 400, errorPage('This client is not registered with this proxy (it may have expired). Start the connection again from the client.'));
  const redirectUri = params.get('redirect_uri') ?? (client.redirectUris.length === 1 ? client.redirectUris[0] : '');
  if (!redirectMatches(client, redirectUri)) return consentPage(res, 400, errorPage('The redirect URI is not one this client registered.'));
  const state = params.get('state');
  // Errors are shown here, never redirected: anyone can register a client, so a redirect to its URI would
  // make this proxy an open redirector (spec basic/authorization: redirect only to trusted URIs).
  const fail = (error: string, description: string) => consentPage(res, 400, errorPage(`The client's request is invalid (${error}): ${description}.`));
  if (params.get('response_type') !== 'code') return fail('unsupported_response_type', 'response_type must be code');
  if (params.get('code_challenge_method') !== 'S256' || !PKCE_CHALLENGE_RE.test(params.get('code_challenge') ?? '')) {
    return fail('invalid_request', 'PKCE with code_challenge_method S256 is required');
  }
  if (!state) return fail('invalid_request', 'state is required');
  const resource = params.get('resource') ?? undefined;
  const audience = resource === undefined ? '*' : audienceOf(proxy, oauth, resource);
  if (audience === null) return fail('invalid_target', 'resource is not an endpoint of this proxy');
  // Full: newcomers wait, and the forms already open (the operator's among them) stay valid.
  if (oauth.consents.size >= proxy.limits.maxPendingConsents) {
    return consentPage(res, 503, errorPage('Too many approvals are waiting. Try again in a few minutes.'), undefined, { 'Retry-After': String(proxy.limits.retryAfterS) });
  }
  const csrf = newToken();
  const pending: PendingConsent = {
    clientId: client.id, redirectUri, state, codeChallenge: params.get('code_challenge')!, audience, resource,
    expiresMs: Date.now() + proxy.limits.consentTtlMs,
  };
  oauth.consents.set(csrf, pending);
  consentPage(res, 200, consentForm(client, pending, csrf, ''), new URL(redirectUri).origin);
}

// Client ID metadata documents ───────
//
// A client may name itself by an https URL whose document lists its name and redirect URIs (spec 2025-11-25
// basic/authorization §Client ID Metadata Documents). Using one means fetching a URL a stranger chose, so
// it is off unless the operator names the hosts (--client-metadata-host claude.ai), and the fetch refuses
// private and loopback addresses (checked on the address actually connected to), redirects, other ports,
// and answers over CIMD_MAX_BYTES or slower than CIMD_TIMEOUT_MS.

const CIMD_CACHE_MS = 3_600_000;
/** A document that could not be fetched is not tried again for this long. */
const CIMD_FAILURE_CACHE_MS = 60_000;
/** Metadata documents fetched at once. */
const CIMD_MAX_FETCHES = 4;
const CIMD_TIMEOUT_MS = 5_000;
const CIMD_MAX_BYTES = 64 * 1024;

/** Addresses a metadata fetch may never reach (RFC 6890 special-purpose ranges). */
const PRIVATE_ADDRESSES = (() => {
  const list = new BlockList();
  for (const [net, prefix] of [['0.0.0.0', 8], ['10.0.0.0', 8], ['100.64.0.0', 10], ['127.0.0.0', 8], ['169.254.0.0', 16], ['172.16.0.0', 12],
    ['192.0.0.0', 24], ['192.168.0.0', 16], ['198.18.0.0', 15], ['224.0.0.0', 4], ['240.0.0.0', 4]] as const) list.addSubnet(net, prefix, 'ipv4');
  for (const [net, prefix] of [['::', 127], ['fc00::', 7], ['fe80::', 10], ['fec0::', 10], ['ff00::', 8], ['::ffff:0:0', 96],
    ['64:ff9b::', 96], ['100::', 64], ['2001::', 32], ['2001:db8::', 32], ['2002::', 16]] as const) list.addSubnet(net, prefix, 'ipv6');
  return list;
})();

function isMetadataUrl(oauth: OAuth, clientId: string): boolean {
  if (oauth.metadataHosts.size === 0 || !clientId.startsWith('https://')) return false;
  try {
    const url = new URL(clientId);
    return url.pathname !== '/' && oauth.metadataHosts.has(url.hostname);
  } catch {
    return false;
  }
}

/**
 * The client a metadata document describes (fetched, or cached for CIMD_CACHE_MS), or why it cannot be used.
 * Strangers choose these URLs, so fetches are few at once and a failure is remembered for a while: the proxy
 * must not become a way to hammer the named host.
 */
async function metadataClient(proxy: Proxy, oauth: OAuth, clientId: string): Promise<OAuthClient | string> {
  const cached = oauth.clients.get(clientId);
  if (cached?.fetchedAtMs !== undefined && Date.now() - cached.fetchedAtMs < CIMD_CACHE_MS) return cached;
  const failed = oauth.metadataFailures.get(clientId);
  if (failed && Date.now() - failed.atMs < CIMD_FAILURE_CACHE_MS) return failed.why;
  if (oauth.metadataFetches >= CIMD_MAX_FETCHES) return 'Too many client metadata documents are being fetched; try again shortly.';
  let document: unknown;
  oauth.metadataFetches++;
  try {
    document = await oauth.fetchMetadata(new URL(clientId));
  } catch (err) {
    proxy.log.warn('oauth', `client metadata document ${clientId}: ${err instanceof ProxyError ? err.message : describeError(err)}`);
    const why = `The client's metadata document could not be fetched: ${err instanceof ProxyError ? err.message : 'network error'}.`;
    if (oauth.metadataFailures.size >= proxy.limits.maxOAuthClients) oauth.metadataFailures.delete(oauth.metadataFailures.keys().next().value!);
    oauth.metadataFailures.set(clientId, { atMs: Date.now(), why });
    return why;
  } finally {
    oauth.metadataFetches--;
  }
  if (!isObject(document) || document.client_id !== clientId) return "The client's metadata document does not name itself (client_id must equal its URL).";
  const parsed = parseClientMetadata({ ...document, token_endpoint_auth_method: document.token_endpoint_auth_method ?? 'none' });
  if (typeof parsed === 'string') return `The client's metadata document is not usable: ${parsed}.`;
  if (parsed.authMethod !== 'none') return "The client's metadata document asks for a client secret, which a document cannot carry.";
  if (!cached && oauth.clients.size >= proxy.limits.maxOAuthClients && !evictUnusedClient(oauth)) return 'Too many registered clients; try again later.';
  const client: OAuthClient = { id: clientId, secretHash: null, createdAtMs: cached?.createdAtMs ?? Date.now(), fetchedAtMs: Date.now(), ...parsed };
  oauth.clients.set(clientId, client);
  return client;
}

/** GET over https on port 443 only, to a public address only, no redirects, bounded in time and size. */
export function fetchClientMetadata(url: URL): Promise<unknown> {
  return new Promise((resolve, reject) => {
    if (url.protocol !== 'https:' || (url.port !== '' && url.port !== '443')) return reject(new ProxyError('CIMD', 'not https on port 443'));
    // An address literal is connected to without a lookup, so it is checked here.
    const literal = url.hostname.replace(/^\[|\]$/g, '');
    const family = isIP(literal);
    if (family !== 0 && PRIVATE_ADDRESSES.check(literal, family === 6 ? 'ipv6' : 'ipv4')) {
      return reject(new ProxyError('CIMD', `${url.hostname} is a private or loopback address`));
    }
    const request = https.request(url, { method: 'GET', headers: { Accept: 'application/json' }, timeout: CIMD_TIMEOUT_MS, lookup: publicOnlyLookup }, (res) => {
      if (res.statusCode !== 200) {
        res.resume();
        return reject(new ProxyError('CIMD', `answered ${res.statusCode}`));
      }
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (chunk: Buffer) => {
        size += chunk.length;
        if (size > CIMD_MAX_BYTES) return request.destroy(new ProxyError('CIMD', `larger than ${CIMD_MAX_BYTES} bytes`));
        chunks.push(chunk);
      });
      res.on('end', () => {
        try {
          resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
        } catch {
          reject(new ProxyError('CIMD', 'not JSON'));
        }
      });
    });
    // Node's `timeout` is idle time; a document trickled a byte at a time needs a deadline of its own.
    const deadline = setTimeout(() => request.destroy(new ProxyError('CIMD', `no answer within ${CIMD_TIMEOUT_MS} ms`)), CIMD_TIMEOUT_MS);
    request.on('close', () => clearTimeout(deadline));
    request.on('timeout', () => request.destroy(new ProxyError('CIMD', `no answer within ${CIMD_TIMEOUT_MS} ms`)));
    request.on('error', (err) => reject(err instanceof ProxyError ? err : new ProxyError('CIMD', (err as NodeJS.ErrnoException).code ?? 'network error')));
    request.end();
  });
}

/** dns.lookup that fails for special-purpose addresses: the check holds for the address the socket uses. */
function publicOnlyLookup(hostname: string, options: object, callback: (...args: any[]) => void): void {
  dnsLookup(hostname, { ...options, all: true }, (err, addresses) => {
    if (err) return callback(err);
    const list = addresses as { address: string; family: number }[];
    const bad = list.find((entry) => PRIVATE_ADDRESSES.check(entry.address, entry.family === 6 ? 'ipv6' : 'ipv4'));
    if (bad || list.length === 0) return callback(new ProxyError('CIMD', `${hostname} resolves to a private or loopback address`));
    if ((options as { all?: boolean }).all) return callback(null, list);
    callback(null, list[0].address, list[0].family);
  });
}

function answerConsent(proxy: Proxy, oauth: OAuth, req: http.IncomingMessage, form: URLSearchParams, res: http.ServerResponse): void {
  const csrf = form.get('csrf') ?? '';
  const pending = oauth.consents.get(csrf);
  // Single use: a replayed or forged form finds nothing.
  oauth.consents.delete(csrf);
  if (!pending || pending.expiresMs < Date.now()) return consentPage(res, 400, errorPage('This approval form has expired or was already used. Start the connection again from the client.'));
  const client = oauth.clients.get(pending.clientId);
  if (!client) return consentPage(res, 400, errorPage('This client is no longer registered. Start the connection again from the client.'));
  const done = (params: Record<string, string>) => redirectWith(res, pending.redirectUri, { ...params, state: pending.state, iss: oauth.issuer });
  if (form.get('action') === 'deny') return done({ error: 'access_denied', error_description: 'The operator denied access' });
  const address = clientAddress(proxy, req);
  if (passphraseRefused(proxy, oauth, address)) {
    proxy.log.warn('oauth', `refused a passphrase attempt from ${address}: too many wrong ones`);
    return consentPage(res, 429, errorPage('Too many wrong passphrases. Wait a few minutes, then start again from the client.'), undefined, { 'Retry-After': String(Math.ceil(proxy.limits.loginFailureWindowMs / 1000)) });
  }
  if (!oauth.checkPassphrase(form.get('passphrase') ?? '')) {
    countWindow(oauth.failures, address, Infinity, proxy.limits.loginFailureWindowMs, proxy.limits);
    countWindow(oauth.failures, ALL_ADDRESSES, Infinity, proxy.limits.loginFailureWindowMs, proxy.limits);
    proxy.log.warn('oauth', `wrong passphrase on the consent page from ${address}`);
    const retry = newToken();
    oauth.consents.set(retry, { ...pending, expiresMs: Date.now() + proxy.limits.consentTtlMs });
    return consentPage(res, 401, consentForm(client, pending, retry, 'Wrong passphrase.'), new URL(pending.redirectUri).origin);
  }
  oauth.failures.delete(address);
  const audience = form.get('all') === 'on' ? '*' : pending.audience;
  if (oauth.codes.size >= proxy.limits.maxAuthCodes) expireOldest(oauth.codes);
  const code = newToken();
  oauth.codes.set(hashToken(code), {
    clientId: pending.clientId, redirectUri: pending.redirectUri, codeChallenge: pending.codeChallenge, audience,
    resource: pending.resource, expiresMs: Date.now() + proxy.limits.authCodeTtlMs, grantId: null,
  });
  proxy.log.info('oauth', `operator approved client ${client.id.slice(0, 8)}… (${JSON.stringify(client.name)}) for ${audience === '*' ? 'every server' : audience}`);
  done({ code });
}

/**
 * Whether an address may not try the passphrase now: past its own budget of wrong ones, or, once wrong ones
 * from everywhere pass the proxy-wide budget, any address that has failed at all. An address with no failure
 * may always try, so strangers guessing cannot lock the operator out; each of their addresses gets only a
 * few guesses, and with a passphrase of 12+ characters that buys them nothing.
 */
function passphraseRefused(proxy: Proxy, oauth: OAuth, address: string): boolean {
  const { loginFailuresPerWindow, loginFailuresTotalPerWindow, loginFailureWindowMs } = proxy.limits;
  const live = (window: Window | undefined) => window && Date.now() - window.startMs < loginFailureWindowMs ? window.count : 0;
  const mine = live(oauth.failures.get(address));
  if (mine >= loginFailuresPerWindow) return true;
  return mine > 0 && live(oauth.failures.get(ALL_ADDRESSES)) >= loginFailuresTotalPerWindow;
}

/** The key of the proxy-wide counter in oauth.failures (no address looks like it). */
const ALL_ADDRESSES = '*';

function redirectWith(res: http.ServerResponse, uri: string, params: Record<string, string>): void {
  const url = new URL(uri);
  for (const [key, value] of Object.entries(params)) url.searchParams.set(key, value);
  res.writeHead(303, { Location: url.href, 'Cache-Control': 'no-store', 'Referrer-Policy': 'no-referrer' });
  res.end();
}

/** Drops the entry that expires first from a bounded map of short-lived entries. */
function expireOldest(map: Map<string, { expiresMs: number }>): void {
  let oldest: string | undefined;
  let at = Infinity;
  for (const [key, entry] of map) if (entry.expiresMs < at) [oldest, at] = [key, entry.expiresMs];
  if (oldest !== undefined) map.delete(oldest);
}

// The consent page: no scripts, one inline style allowed by its hash, no framing, no caching.
const CONSENT_CSS = 'body{font:16px/1.5 system-ui,sans-serif;max-width:34em;margin:3em auto;padding:0 1em;color:#111}' +
  'h1{font-size:1.4em}.box{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1em 0}.warn{background:#fff3cd;border-color:#e0b000}' +
  '.ok{background:#eef7ee}.err{color:#a00;font-weight:bold}code{font-size:1.05em}input[type=password]{width:100%;box-sizing:border-box;padding:.4em;font-size:1em}' +
  'button{font-size:1em;padding:.4em 1.2em;margin-right:.6em}';
const CONSENT_CSS_HASH = `'sha256-${createHash('sha256').update(CONSENT_CSS).digest('base64')}'`;

function consentPage(res: http.ServerResponse, status: number, body: string, redirectOrigin?: string, headers: Record<string, string> = {}): void {
  const html = `<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">` +
    `<title>remote-mcp-proxy: authorize</title><style>${CONSENT_CSS}</style></head><body>${body}</body></html>`;
  // form-action must also allow the redirect's origin: browsers apply it to the redirect after the POST.
  const formAction = redirectOrigin ? `'self' ${redirectOrigin}` : `'self'`;
  res.writeHead(status, {
    ...headers,
    'Content-Type': 'text/html; charset=utf-8',
    'Content-Length': Buffer.byteLength(html),
    'Content-Security-Policy': `default-src 'none'; style-src ${CONSENT_CSS_HASH}; form-action ${formAction}; frame-ancestors 'none'; base-uri 'none'`,
    'X-Frame-Options': 'DENY',
    'X-Content-Type-Options': 'nosniff',
    // Not no-referrer: with it the browser sends `Origin: null` on the form's POST, which the Origin check
    // (rightly) refuses. same-origin sends nothing to other sites.
    'Referrer-Policy': 'same-origin',
    'Cache-Control': 'no-store',
  });
  res.end(html);
}

function errorPage(message: string): string {
  return `<h1>Cannot authorize</h1><p class="err">${escapeHtml(message)}</p>`;
}

function consentForm(client: OAuthClient, pending: PendingConsent, csrf: string, error: string): string {
  const redirect = new URL(pending.redirectUri);
  const host = redirect.host;
  const claude = CLAUDE_CALLBACKS.includes(redirect.href);
  const loopback = LOOPBACK_HOSTNAMES.has(redirect.hostname);
  const where = claude
    ? `<div class="box ok">Sends you back to <b>${escapeHtml(host)}</b>: Claude.</div>`
    : loopback
      ? `<div class="box ok">Sends you back to <b>${escapeHtml(host)}</b>: a program on the computer where your browser runs.</div>`
      : `<div class="box warn">Sends you back to <b>${escapeHtml(host)}</b>. This is not Claude: approve only if you know this site.</div>`;
  const what = pending.audience === '*'
    ? '<b>every server</b> of this proxy (the client did not name one)'
    : `the server <b>${escapeHtml(pending.audience)}</b>`;
  return `<h1>Allow ${escapeHtml(client.name)}?</h1>` +
    // The name is the client's own claim; the redirect host below is what identifies it.
    `<p>A client that calls itself <b>${escapeHtml(client.name)}</b> asks to use ${what} on your behalf.</p>${where}` +
    '<p>Approve only if you started this connection yourself, just now.</p>' +
    (error ? `<p class="err">${escapeHtml(error)}</p>` : '') +
    `<form method="post" action="/authorize"><input type="hidden" name="csrf" value="${csrf}">` +
    `<p><label>Passphrase of this proxy<br><input type="password" name="passphrase" autocomplete="current-password" autofocus></label></p>` +
    (pending.audience === '*' ? '' : '<p><label><input type="checkbox" name="all"> allow every server of this proxy, not only this one</label></p>') +
    `<p><button type="submit" name="action" value="approve">Approve</button><button type="submit" name="action" value="deny">Deny</button></p></form>`;
}

// Tokens (/token, /revoke) ───────

type TokenParams = URLSearchParams;

async function handleToken(proxy: Proxy, oauth: OAuth, req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
  if (req.method !== 'POST') return oauthError(res, 405, 'invalid_request', 'POST form-encoded parameters', { Allow: 'POST' });
  if (tokenRequestsExceeded(proxy, oauth, req, res)) return;
  const body = await readFormOrJson(proxy, req, res);
  if (body === null) return;
  const params = new URLSearchParams(body);
  const client = authenticateClient(oauth, req, params);
  // 401 invalid_client makes Claude.ai register again (its DCR clients are per connection).
  if (!client) return oauthError(res, 401, 'invalid_client', 'Unknown client or wrong secret', { 'WWW-Authenticate': 'Basic realm="remote-mcp-proxy"' });
  const grantType = params.get('grant_type');
  if (grantType === 'authorization_code') return exchangeCode(proxy, oauth, client, params, res);
  if (grantType === 'refresh_token') return refreshGrant(proxy, oauth, client, params, res);
  oauthError(res, 400, 'unsupported_grant_type', 'grant_type must be authorization_code or refresh_token');
}

/** Token and revocation requests per client address: client secrets and codes are not to be guessed at speed. */
function tokenRequestsExceeded(proxy: Proxy, oauth: OAuth, req: http.IncomingMessage, res: http.ServerResponse): boolean {
  if (countWindow(oauth.tokenRequests, clientAddress(proxy, req), proxy.limits.tokenRequestsPerMinute, 60_000, proxy.limits)) return false;
  oauthError(res, 429, 'slow_down', 'Too many token requests; retry later', { 'Retry-After': '60' });
  return true;
}

/**
 * The client, if it proves to be one: client_secret_basic, client_secret_post, or a public client's bare id.
 * Any of them works whatever it registered with (Claude.ai sends client_secret_post even when registered as
 * basic: github.com/anthropics/claude-ai-mcp/issues/667), but a client with a secret must present it.
 */
function authenticateClient(oauth: OAuth, req: http.IncomingMessage, params: TokenParams): OAuthClient | null {
  let id = params.get('client_id');
  let secret = params.get('client_secret');
  const basic = /^Basic[ \t]+(\S+)\s*$/i.exec(req.headers.authorization ?? '');
  if (basic) {
    const decoded = Buffer.from(basic[1], 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    if (colon === -1) return null;
    // RFC 6749 §2.3.1: both parts are form-urlencoded inside the header.
    id = decodeFormComponent(decoded.slice(0, colon));
    secret = decodeFormComponent(decoded.slice(colon + 1));
  }
  const client = id ? oauth.clients.get(id) : undefined;
  if (!client) return null;
  if (client.secretHash === null) return client;
  return secret !== null && equalHex(hashToken(secret), client.secretHash) ? client : null;
}

function decodeFormComponent(text: string): string {
  try {
    return decodeURIComponent(text.replace(/\+/g, ' '));
  } catch {
    return text;
  }
}

function exchangeCode(proxy: Proxy, oauth: OAuth, client: OAuthClient, params: TokenParams, res: http.ServerResponse): void {
  const key = hashToken(params.get('code') ?? '');
  const code = oauth.codes.get(key);
  if (!code || code.clientId !== client.id) return oauthError(res, 400, 'invalid_grant', 'Unknown or expired code');
  if (code.grantId !== null) {
    // A code used twice was intercepted: what it granted is revoked (RFC 6749 §4.1.2).
    const grant = oauth.grants.get(code.grantId);
    if (grant) revokeGrant(oauth, grant, 'authorization code used twice');
    saveState(oauth);
    proxy.log.warn('oauth', `an authorization code was used twice; revoked what it granted to client ${client.id.slice(0, 8)}…`);
    return oauthError(res, 400, 'invalid_grant', 'Code already used');
  }
  if (code.expiresMs < Date.now()) return oauthError(res, 400, 'invalid_grant', 'Code expired');
  if (params.get('redirect_uri') !== null && params.get('redirect_uri') !== code.redirectUri) return oauthError(res, 400, 'invalid_grant', 'redirect_uri does not match');
  const verifier = params.get('code_verifier') ?? '';
  const challenge = createHash('sha256').update(verifier).digest('base64url');
  if (!PKCE_VERIFIER_RE.test(verifier) || !equalHex(challenge, code.codeChallenge)) return oauthError(res, 400, 'invalid_grant', 'PKCE verification failed');
  const resource = params.get('resource');
  if (resource !== null && code.resource !== undefined && resource !== code.resource) return oauthError(res, 400, 'invalid_target', 'resource differs from the authorization request');
  if (oauth.grants.size >= proxy.limits.maxOAuthGrants) return oauthError(res, 503, 'temporarily_unavailable', 'Too many grants', { 'Retry-After': String(proxy.limits.retryAfterS) });
  const grant: Grant = {
    id: newToken(), clientId: client.id, audience: code.audience, access: [],
    refreshHashes: [], previousRefreshHash: null, retiredRefreshHashes: [], refreshExpiresMs: 0, createdAtMs: Date.now(),
  };
  code.grantId = grant.id;
  issueTokens(proxy, oauth, grant, res);
  oauth.audit({ event: 'grant', credential: `oauth:${grant.id}`, client: auditName(client.name), audience: grant.audience });
}

/**
 * Refresh tokens rotate on every use (OAuth 2.1 §4.3.1). The token just replaced stays valid until a successor
 * is first used, so an answer lost on the way, or two refreshes at once (Claude refreshes both ahead of expiry
 * and on a 401), do not log the client out: each gets a successor, and the first successor used retires the
 * rest. A token presented after it was retired was stolen or replayed, and the whole grant is revoked.
 */
function refreshGrant(proxy: Proxy, oauth: OAuth, client: OAuthClient, params: TokenParams, res: http.ServerResponse): void {
  const presented = hashToken(params.get('refresh_token') ?? '');
  const grant = oauth.byRefresh.get(presented);
  if (!grant) {
    const stolen = oauth.byRetired.get(presented);
    if (stolen) {
      revokeGrant(oauth, stolen, 'rotated refresh token used again');
      saveState(oauth);
      proxy.log.warn('oauth', `a rotated refresh token was used again; revoked the grant of client ${stolen.clientId.slice(0, 8)}…`);
    }
    return oauthError(res, 400, 'invalid_grant', 'Unknown, expired or revoked refresh token');
  }
  if (grant.clientId !== client.id) return oauthError(res, 400, 'invalid_grant', 'Refresh token of another client');
  if (grant.refreshExpiresMs < Date.now()) {
    revokeGrant(oauth, grant, 'refresh token expired');
    saveState(oauth);
    return oauthError(res, 400, 'invalid_grant', 'Refresh token expired');
  }
  const resource = params.get('resource');
  if (resource !== null && grant.audience !== '*' && audienceOf(proxy, oauth, resource) !== grant.audience) {
    return oauthError(res, 400, 'invalid_target', 'resource is not the server this grant is for');
  }
  if (grant.refreshHashes.includes(presented)) {
    unindexGrant(oauth, grant); // re-indexed with the new tokens by issueTokens
    const retire = [...grant.refreshHashes.filter((hash) => hash !== presented), ...(grant.previousRefreshHash ? [grant.previousRefreshHash] : [])];
    grant.retiredRefreshHashes = [...grant.retiredRefreshHashes, ...retire].slice(-MAX_RETIRED_REFRESH_TOKENS);
    grant.previousRefreshHash = presented;
    grant.refreshHashes = [];
  } else if (grant.refreshHashes.length >= MAX_REFRESH_SUCCESSORS) {
    return oauthError(res, 400, 'invalid_grant', 'This refresh token was replaced; use the newest one');
  } else unindexGrant(oauth, grant); // the previous token again: one more successor, none retired
  issueTokens(proxy, oauth, grant, res);
}

function issueTokens(proxy: Proxy, oauth: OAuth, grant: Grant, res: http.ServerResponse): void {
  const access = newToken();
  const refresh = newToken();
  const now = Date.now();
  const issued = { hash: hashToken(access), expiresMs: now + proxy.limits.accessTokenTtlMs };
  grant.access = [...grant.access.filter((old) => old.expiresMs > now), issued].slice(-MAX_ACCESS_TOKENS);
  grant.refreshHashes.push(hashToken(refresh));
  grant.refreshExpiresMs = now + proxy.limits.refreshTokenTtlMs;
  indexGrant(oauth, grant);
  saveState(oauth);
  sendJson(res, 200, JSON.stringify({
    access_token: access, token_type: 'Bearer', expires_in: Math.floor(proxy.limits.accessTokenTtlMs / 1000), refresh_token: refresh,
  }), { 'Cache-Control': 'no-store', Pragma: 'no-cache' });
}

/** RFC 7009: the grant a token belongs to is revoked; unknown tokens get 200 too (§2.2). */
async function handleRevoke(proxy: Proxy, oauth: OAuth, req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
  if (req.method !== 'POST') return oauthError(res, 405, 'invalid_request', 'POST form-encoded parameters', { Allow: 'POST' });
  if (tokenRequestsExceeded(proxy, oauth, req, res)) return;
  const body = await readFormOrJson(proxy, req, res);
  if (body === null) return;
  const params = new URLSearchParams(body);
  const client = authenticateClient(oauth, req, params);
  if (!client) return oauthError(res, 401, 'invalid_client', 'Unknown client or wrong secret');
  const hash = hashToken(params.get('token') ?? '');
  const grant = oauth.byAccess.get(hash) ?? oauth.byRefresh.get(hash);
  if (grant && grant.clientId === client.id) {
    revokeGrant(oauth, grant, 'revoked by its client');
    saveState(oauth);
    proxy.log.info('oauth', `client ${client.id.slice(0, 8)}… revoked its grant`);
  }
  res.writeHead(200, { 'Cache-Control': 'no-store' }).end();
}

/** The grant an access token (by its hashToken) belongs to, while it is valid. */
function grantOfAccessToken(oauth: OAuth, hash: string): Grant | null {
  const grant = oauth.byAccess.get(hash);
  const access = grant?.access.find((entry) => entry.hash === hash);
  return grant && access && access.expiresMs > Date.now() ? grant : null;
}

function oauthError(res: http.ServerResponse, status: number, error: string, description: string, headers: Record<string, string> = {}): void {
  sendJson(res, status, JSON.stringify({ error, error_description: description }), { ...headers, 'Cache-Control': 'no-store' });
}

/** A small body of an OAuth endpoint (form or JSON), bounded by maxOAuthBodyBytes; null when answered. */
async function readFormOrJson(proxy: Proxy, req: http.IncomingMessage, res: http.ServerResponse): Promise<string | null> {
  if (Number(req.headers['content-length']) > proxy.limits.maxOAuthBodyBytes) {
    oauthError(res, 413, 'invalid_request', 'Request body too large', { Connection: 'close' });
    req.resume();
    return null;
  }
  return withBody(proxy, req, res, proxy.limits.maxOAuthBodyBytes, (body) => body.toString('utf8'));
}

/**
 * Who a request came from, for per-address rate limits. X-Forwarded-For is believed only when the connection
 * comes from a proxy the operator named (--trust-proxy): its rightmost address not itself a trusted proxy.
 * Without that, behind a reverse proxy every client shares the proxy's address, and one budget. IPv6
 * addresses count by their /64, which one host usually holds whole.
 */
function clientAddress(proxy: Proxy, req: http.IncomingMessage): string {
  let address = req.socket.remoteAddress ?? 'unknown';
  const forwarded = req.headers['x-forwarded-for'];
  if (proxy.trustedProxies && typeof forwarded === 'string' && isTrusted(proxy.trustedProxies, address)) {
    const hops = forwarded.split(',').map((hop) => hop.trim());
    while (hops.length > 1 && isTrusted(proxy.trustedProxies, hops[hops.length - 1])) hops.pop();
    // The entry our trusted proxy wrote; anything but a bare address (a port, "unknown") is not believed, and
    // nothing left of it is either: those entries come from the client.
    const nearest = hops[hops.length - 1];
    if (isIP(nearest) !== 0) address = nearest;
  }
  return addressKey(address);
}

function isTrusted(list: BlockList, address: string): boolean {
  const family = isIP(address);
  return family !== 0 && list.check(address, family === 6 ? 'ipv6' : 'ipv4');
}

function addressKey(address: string): string {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (mapped) return mapped[1];
  if (isIP(address) !== 6) return address;
  const groups = expandIpv6(address);
  return groups ? `${groups.slice(0, 4).join(':')}::/64` : address;
}

/** The eight groups of an IPv6 address (no embedded IPv4), or null. */
function expandIpv6(address: string): string[] | null {
  const [head, tail] = address.split('::');
  const left = head ? head.split(':') : [];
  const right = tail ? tail.split(':') : [];
  if (address.includes('.') || (tail === undefined && left.length !== 8)) return null;
  return [...left, ...Array(8 - left.length - right.length).fill('0'), ...right];
}

/** Counts one event in an address's fixed window; false when the window already holds `max`. Bounded map. */
function countWindow(windows: Map<string, Window>, address: string, max: number, windowMs: number, limits: Limits): boolean {
  const now = Date.now();
  let window = windows.get(address);
  if (!window || now - window.startMs >= windowMs) {
    if (!window && windows.size >= limits.maxRateLimitedAddresses) windows.delete(windows.keys().next().value!);
    window = { count: 0, startMs: now };
    windows.set(address, window);
  }
  if (window.count >= max) return false;
  window.count++;
  return true;
}

/** Part of the periodic sweep: expired codes, consents, windows, grants and never-used clients go. */
function sweepOAuth(oauth: OAuth, limits: Limits, now: number): void {
  for (const [key, code] of oauth.codes) if (code.expiresMs < now) oauth.codes.delete(key);
  for (const [key, consent] of oauth.consents) if (consent.expiresMs < now) oauth.consents.delete(key);
  for (const [key, window] of oauth.failures) if (now - window.startMs >= limits.loginFailureWindowMs) oauth.failures.delete(key);
  for (const [key, window] of oauth.registrations) if (now - window.startMs >= 60_000) oauth.registrations.delete(key);
  for (const [key, window] of oauth.consentPages) if (now - window.startMs >= 60_000) oauth.consentPages.delete(key);
  for (const [key, window] of oauth.tokenRequests) if (now - window.startMs >= 60_000) oauth.tokenRequests.delete(key);
  let changed = false;
  for (const grant of [...oauth.grants.values()]) {
    if (grant.refreshExpiresMs < now) {
      revokeGrant(oauth, grant, 'expired');
      changed = true;
    }
  }
  const granted = new Set([...oauth.grants.values()].map((grant) => grant.clientId));
  for (const client of [...oauth.clients.values()]) {
    if (!granted.has(client.id) && !client.preRegistered && now - client.createdAtMs > limits.unusedClientMs) {
      oauth.clients.delete(client.id);
      changed = true;
    }
  }
  if (changed) saveState(oauth);
}

/** Routes the authorization server's own endpoints; false when the path is not one of them. */
function routeOAuth(proxy: Proxy, req: http.IncomingMessage, res: http.ServerResponse, path: string, query: string): Promise<void> | boolean {
  const oauth = proxy.oauth;
  if (!oauth) return false;
  const host = req.headers.host;
  const prm = '/.well-known/oauth-protected-resource';
  if (path === prm || path.startsWith(`${prm}/`)) return protectedResourceMetadata(proxy, oauth, host, path.slice(prm.length), res), true;
  if (path === '/.well-known/oauth-authorization-server' || path === '/.well-known/openid-configuration') return authorizationServerMetadata(oauth, res), true;
  if (path === '/authorize') return handleAuthorize(proxy, oauth, req, res, query);
  if (path === '/token') return handleToken(proxy, oauth, req, res);
  if (path === '/register') return handleRegister(proxy, oauth, req, res);
  if (path === '/revoke') return handleRevoke(proxy, oauth, req, res);
  // Other well-known documents (path-suffixed AS metadata, …) do not exist: 404, not a bearer challenge.
  if (path.startsWith('/.well-known/')) return reject(res, 404, SERVER_ERROR, 'Not Found'), true;
  return false;
}

// ── 11. Operations: metrics and status page ─────────────────────────────────────────────────────────────
//
// /metrics in the Prometheus text format 0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/),
// written by hand, and a status page at /, both on the main port behind the guards of the MCP endpoints, so
// one port and one credential serve everything. The request path pays a few increments (countRequest,
// countAnswer) and one per stdout chunk; sessions, queues, stdin bytes and process figures are read when
// scraped. Label values are bounded: server names by the config, methods by MCP_METHODS ("other" for the rest).

/** Per-server counters. They only grow (Prometheus counters), and live as long as the server's entry. */
type ServerStats = {
  /** Processes spawned: the first, each restart, each per-session child. */
  childrenStarted: number;
  /** Restarts after an unexpected exit (what the restart policy scheduled), over every child of the server. */
  restarts: number;
  /** The last unexpected exit: shell-style code (128+n for signal n; null for a spawn that failed), description, time (0: none yet). */
  lastExitCode: number | null;
  lastExitReason: string;
  lastExitAtMs: number;
  /** Client requests forwarded to a child, and those answered with an error (by the child or the proxy), by methodIndex. */
  requests: Float64Array;
  errors: Float64Array;
  /** Those requests' latency: answers per LATENCY_BUCKETS_MS bucket (not cumulative; the last one is above every bound), and the sum. */
  latencyCounts: Float64Array;
  latencySumMs: number;
  /** Bytes handed to children's stdin (Node's own count, read at scrape and at exit) and read from their stdout. */
  stdinBytes: number;
  stdoutBytes: number;
  /** Refused before any child saw them (section 9): tools/call by the tool policy, requests by the rate limit. */
  toolCallsBlocked: number;
  rateLimited: number;
  /** The last RECENT_PROBLEMS_PER_SERVER warnings and errors logged for the server, as logged (masked, escaped). */
  problems: Problem[];
};

type Problem = { atMs: number; level: 'warn' | 'error'; text: string };

const METHOD_INDEX: ReadonlyMap<string, number> = new Map(MCP_METHODS.map((method, i) => [method, i]));
/** The index counting every method not in MCP_METHODS. */
const OTHER_METHOD = MCP_METHODS.length;
const LATENCY_BUCKETS_MS: readonly number[] = LATENCY_BUCKETS_S.map((s) => s * 1000);
const SERVER_STATES: readonly ServerState[] = ['starting', 'ready', 'restarting', 'errored', 'stopped'];
/** The exposition format's own content type, version included (text format 0.0.4). */
const METRICS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';
const OAUTH_CREDENTIAL = 'oauth:';

function newServerStats(): ServerStats {
  return {
    childrenStarted: 0, restarts: 0, lastExitCode: null, lastExitReason: '', lastExitAtMs: 0,
    requests: new Float64Array(OTHER_METHOD + 1), errors: new Float64Array(OTHER_METHOD + 1),
    latencyCounts: new Float64Array(LATENCY_BUCKETS_MS.length + 1), latencySumMs: 0, stdinBytes: 0, stdoutBytes: 0, toolCallsBlocked: 0, rateLimited: 0, problems: [],
  };
}

function methodIndex(method: string): number {
  return METHOD_INDEX.get(method) ?? OTHER_METHOD;
}

// Counting ───────

/** A client request was written to a child (sendRequest). */
function countRequest(server: ServerRuntime, method: string): void {
  server.stats.requests[methodIndex(method)]++;
}

/**
 * A client request got its answer: the child's, or the proxy's error when it was given up on (cancelled, timed
 * out, its child gone). Called once per request, where its Pending entry is removed. The proxy's own requests
 * (initialize, re-subscribe) are not clients' and are not counted.
 */
function countAnswer(server: ServerRuntime, pending: Pending, outcome: string): void {
  if (!pending.session) return;
  if (pending.tool !== undefined) auditToolCall(server, pending, outcome); // the audit log hooks in here (section 9)
  const error = outcome !== 'ok' && outcome !== 'tool error';
  const stats = server.stats;
  if (error) stats.errors[methodIndex(pending.method)]++;
  const ms = Date.now() - pending.sentAtMs;
  let bucket = 0;
  while (bucket < LATENCY_BUCKETS_MS.length && ms > LATENCY_BUCKETS_MS[bucket]) bucket++; // le is inclusive
  stats.latencyCounts[bucket]++;
  stats.latencySumMs += ms;
}

/**
 * Adds what this child's stdin took since it was last counted. Node counts written bytes itself (in C++, as
 * each write completes), so the request path pays nothing here; bytes still queued in Node count as written.
 */
function countStdinBytes(up: Upstream): void {
  const written = (up.proc?.stdin as Socket | null | undefined)?.bytesWritten;
  if (typeof written !== 'number' || written <= up.stdinBytesCounted) return;
  up.server.stats.stdinBytes += written - up.stdinBytesCounted;
  up.stdinBytesCounted = written;
}

/** An unexpected exit (onChildExit; a child being stopped on purpose is not one). */
function recordExit(stats: ServerStats, exit: string, exitCode: number | null): void {
  stats.lastExitCode = exitCode;
  stats.lastExitReason = exit;
  stats.lastExitAtMs = Date.now();
}

/** The code a shell would report (tini): the exit code, or 128 + the signal's number. */
function shellExitCode(code: number | null, signal: NodeJS.Signals | null): number | null {
  if (signal) return 128 + (osConstants.signals[signal] ?? 0);
  return code;
}

/**
 * Keeps each server's last warnings and errors for the status page. It sits under safeLogger, so it sees lines
 * exactly as they are logged: secrets masked, control characters escaped, never a payload (section 3). A line
 * belongs to a server when its scope is the server's name (every child event is logged so).
 */
function recordingProblems(base: Logger, servers: ReadonlyMap<string, ServerRuntime>, clean: (text: string) => string): Logger {
  const record = (level: Problem['level'], scope: string, raw: string) => {
    // The scope as the caller wrote it (a server's name with its control characters); the text as logged.
    const server = servers.get(serverSegment(scope));
    // Not a server: 'http', 'proxy', 'oauth' (a server named so gets those lines too).
    if (!server || server.config.name !== scope) return;
    const text = clean(raw);
    const problems = server.stats.problems;
    problems.push({ atMs: Date.now(), level, text: text.length > RECENT_PROBLEM_CHARS ? `${text.slice(0, RECENT_PROBLEM_CHARS)}…` : text });
    if (problems.length > RECENT_PROBLEMS_PER_SERVER) problems.shift();
  };
  return {
    error: (scope, text) => (base.error(scope, text), record('error', scope, text)),
    warn: (scope, text) => (base.warn(scope, text), record('warn', scope, text)),
    info: (scope, text) => base.info(scope, text),
    debug: (scope, text) => base.debug(scope, text),
    enabled: (level) => base.enabled(level),
  };
}

// Serving ───────

/**
 * GET /metrics and GET / (the status page). Same credentials as the MCP endpoints: a static token, anyone on
 * a loopback bind without auth, and an OAuth access token whose grant covers every server. A token granted
 * for one server gets 403: the operator consented to that server, and these pages name every server, its
 * URLs and its recent errors.
 */
function handleOperations(proxy: Proxy, req: http.IncomingMessage, res: http.ServerResponse, path: string): void {
  const credential = authorized(proxy, req.headers.authorization);
  if (typeof credential !== 'string') {
    const failure = credential === FORBIDDEN ? 'invalid' : credential.failure; // FORBIDDEN needs a route: not here
    return reject(res, 401, SERVER_ERROR, 'Unauthorized', { 'WWW-Authenticate': bearerChallenge(proxy, null, failure) });
  }
  if (credential.startsWith(OAUTH_CREDENTIAL) && proxy.oauth?.grants.get(credential.slice(OAUTH_CREDENTIAL.length))?.audience !== '*') {
    return reject(res, 403, SERVER_ERROR, 'Forbidden: this token is for one server', { 'WWW-Authenticate': 'Bearer error="insufficient_scope"' });
  }
  // Without auth on a public bind (--allow-unauthenticated) Host is not checked, and a browser's same-origin
  // GET carries no Origin: a DNS-rebinding page could read these pages (every useful /mcp request is a POST,
  // which does carry one). They need a token there.
  if (credential === ANONYMOUS && !proxy.loopbackBind) {
    return reject(res, 403, SERVER_ERROR, 'Forbidden: on a non-loopback address without auth, /metrics and the status page are off; set a token');
  }
  if (req.method !== 'GET' && req.method !== 'HEAD') return reject(res, 405, SERVER_ERROR, 'Method Not Allowed', { Allow: 'GET, HEAD' });
  const now = Date.now();
  const [body, headers] = path === '/metrics' ? [renderMetrics(proxy, now), METRICS_HEADERS] : [statusPage(proxy, now), STATUS_HEADERS];
  res.writeHead(200, { ...headers, 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

const METRICS_HEADERS: Readonly<Record<string, string>> = {
  'Content-Type': METRICS_CONTENT_TYPE, 'Cache-Control': 'no-store', 'X-Content-Type-Options': 'nosniff',
};

// Metrics ───────

type MetricType = 'counter' | 'gauge' | 'histogram';

/** A label value as the format requires: backslash, double quote and line feed escaped. */
function escapeLabel(value: string): string {
  return value.replace(/[\\"\n]/g, (c) => (c === '\n' ? '\\n' : `\\${c}`));
}

/** The whole exposition: one HELP and TYPE per family, then its samples; a family with no sample is left out. */
function renderMetrics(proxy: Proxy, now: number): string {
  const out: string[] = [];
  const family = (name: string, type: MetricType, help: string, samples: string[]) => {
    if (samples.length) out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, ...samples);
  };
  const servers = [...proxy.servers.values()];
  const label = new Map(servers.map((server) => [server, `server="${escapeLabel(server.config.name)}"`]));
  const each = (name: string, value: (server: ServerRuntime) => number | null) =>
    servers.flatMap((server) => {
      const v = value(server);
      return v === null ? [] : [`${name}{${label.get(server)}} ${v}`];
    });
  const state = (name: string) => servers.flatMap((server) => {
    const current = serverState(server);
    return SERVER_STATES.map((s) => `${name}{${label.get(server)},state="${s}"} ${s === current ? 1 : 0}`);
  });
  family('mcp_proxy_server_state', 'gauge', 'Server state, 1 for the current one (per-session servers: ready unless a child gave up).', state('mcp_proxy_server_state'));
  family('mcp_proxy_server_uptime_seconds', 'gauge', "Run time of a shared server's current child process.",
    each('mcp_proxy_server_uptime_seconds', (s) => (s.shared?.proc ? (now - s.shared.startedAtMs) / 1000 : null)));
  family('mcp_proxy_children', 'gauge', 'Child processes running.', each('mcp_proxy_children', (s) => childrenOf(s).filter((up) => up.proc).length));
  family('mcp_proxy_children_started_total', 'counter', 'Child processes spawned, restarts and per-session children included.',
    each('mcp_proxy_children_started_total', (s) => s.stats.childrenStarted));
  family('mcp_proxy_restarts_total', 'counter', 'Restarts after a child exited unexpectedly.', each('mcp_proxy_restarts_total', (s) => s.stats.restarts));
  family('mcp_proxy_tool_calls_blocked_total', 'counter', 'tools/call refused by the server\'s tool policy (never reached the child).',
    each('mcp_proxy_tool_calls_blocked_total', (s) => s.stats.toolCallsBlocked));
  family('mcp_proxy_rate_limited_total', 'counter', 'POSTs refused with 429 by the per-credential rate limit.',
    each('mcp_proxy_rate_limited_total', (s) => s.stats.rateLimited));
  family('mcp_proxy_last_exit_code', 'gauge', 'Exit code of the last unexpected child exit (128+n: killed by signal n).',
    each('mcp_proxy_last_exit_code', (s) => s.stats.lastExitCode));
  family('mcp_proxy_sessions', 'gauge', 'Client sessions open, by transport (streamable: Streamable HTTP; sse: HTTP+SSE).', servers.flatMap((server) => {
    let streamable = 0;
    for (const session of server.sessions.values()) if (session.transport === 'streamable') streamable++;
    const l = label.get(server);
    return [`mcp_proxy_sessions{${l},transport="streamable"} ${streamable}`, `mcp_proxy_sessions{${l},transport="sse"} ${server.sessions.size - streamable}`];
  }));
  family('mcp_proxy_requests_total', 'counter', 'Client requests forwarded to a child, by MCP method ("other": not in the spec).', byMethod(servers, label, 'mcp_proxy_requests_total', 'requests'));
  family('mcp_proxy_request_errors_total', 'counter', 'Of those, answered with an error (by the child, or by the proxy: timeout, cancellation, child exit).',
    byMethod(servers, label, 'mcp_proxy_request_errors_total', 'errors'));
  family('mcp_proxy_request_duration_seconds', 'histogram', 'Time from writing a client request to a child to its answer.', servers.flatMap((s) => histogram(s, label.get(s)!)));
  family('mcp_proxy_requests_in_flight', 'gauge', 'Requests written to a child and not answered yet.', each('mcp_proxy_requests_in_flight', (s) => sumOf(s, (up) => up.pending.size)));
  for (const up of servers.flatMap(childrenOf)) countStdinBytes(up);
  family('mcp_proxy_child_stdin_bytes_total', 'counter', "Bytes written to children's stdin.", each('mcp_proxy_child_stdin_bytes_total', (s) => s.stats.stdinBytes));
  family('mcp_proxy_child_stdout_bytes_total', 'counter', "Bytes read from children's stdout.", each('mcp_proxy_child_stdout_bytes_total', (s) => s.stats.stdoutBytes));
  family('mcp_proxy_child_stdin_queue_bytes', 'gauge', "Bytes queued for children's stdin, not yet taken by the pipe (limit: maxChildQueueBytes per child).",
    each('mcp_proxy_child_stdin_queue_bytes', (s) => sumOf(s, (up) => up.outBytes + (up.proc?.stdin?.writableLength ?? 0))));
  family('mcp_proxy_lane_queue_depth', 'gauge', "Requests waiting for a child's lane (servers with clientCapabilities).", each('mcp_proxy_lane_queue_depth', (s) => sumOf(s, (up) => up.laneQueue.length)));
  family('mcp_proxy_start_queue_depth', 'gauge', 'Children waiting for a start slot (startConcurrency).', [`mcp_proxy_start_queue_depth ${proxy.startQueue.length}`]);
  family('mcp_proxy_connections', 'gauge', 'Client connections open.', [`mcp_proxy_connections ${proxy.connections.size}`]);
  family('mcp_proxy_process_resident_memory_bytes', 'gauge', "The proxy's resident set size.", [`mcp_proxy_process_resident_memory_bytes ${process.memoryUsage.rss()}`]);
  const fds = openDescriptors();
  family('mcp_proxy_process_open_fds', 'gauge', 'File descriptors the proxy has open (Linux only).', fds === null ? [] : [`mcp_proxy_process_open_fds ${fds}`]);
  family('mcp_proxy_uptime_seconds', 'gauge', 'Time since the proxy process started.', [`mcp_proxy_uptime_seconds ${process.uptime()}`]);
  return out.join('\n') + '\n';
}

function childrenOf(server: ServerRuntime): Upstream[] {
  return [...server.upstreams, ...server.windingDown];
}

function sumOf(server: ServerRuntime, value: (up: Upstream) => number): number {
  let sum = 0;
  for (const up of childrenOf(server)) sum += value(up);
  return sum;
}

/** One sample per method that was ever requested (its errors too, zero or not): absent methods are zero. */
function byMethod(servers: readonly ServerRuntime[], label: ReadonlyMap<ServerRuntime, string>, name: string, field: 'requests' | 'errors'): string[] {
  return servers.flatMap((server) => {
    const { requests, errors } = server.stats;
    const samples: string[] = [];
    for (let i = 0; i <= OTHER_METHOD; i++) {
      if (requests[i] === 0 && errors[i] === 0) continue;
      const method = i === OTHER_METHOD ? 'other' : MCP_METHODS[i];
      samples.push(`${name}{${label.get(server)},method="${method}"} ${server.stats[field][i]}`);
    }
    return samples;
  });
}

/** Cumulative buckets in increasing `le`, then +Inf (equal to _count), _sum and _count. */
function histogram(server: ServerRuntime, label: string): string[] {
  const name = 'mcp_proxy_request_duration_seconds';
  const { latencyCounts, latencySumMs } = server.stats;
  const lines: string[] = [];
  let cumulative = 0;
  LATENCY_BUCKETS_S.forEach((le, i) => {
    cumulative += latencyCounts[i];
    lines.push(`${name}_bucket{${label},le="${le}"} ${cumulative}`);
  });
  cumulative += latencyCounts[LATENCY_BUCKETS_S.length];
  lines.push(`${name}_bucket{${label},le="+Inf"} ${cumulative}`, `${name}_sum{${label}} ${latencySumMs / 1000}`, `${name}_count{${label}} ${cumulative}`);
  return lines;
}

/** Entries of /proc/self/fd (the descriptor reading it is one of them), or null off Linux. */
function openDescriptors(): number | null {
  if (process.platform !== 'linux') return null;
  try {
    return readdirSync('/proc/self/fd').length - 1;
  } catch {
    return null; // no /proc (a restricted container): the metric is left out rather than guessed
  }
}

// Status page ───────

// No script, one inline style allowed by its hash, no external asset, no framing, no caching; it reloads
// itself with a meta refresh.
const STATUS_CSS = 'body{font:15px/1.45 system-ui,sans-serif;max-width:56em;margin:2em auto;padding:0 1em;color:#111}' +
  'h1{font-size:1.4em;margin-bottom:.2em}h2{font-size:1.15em;margin:0 0 .5em}h3{font-size:.95em;margin:.8em 0 .3em}' +
  '.meta{color:#555;margin-top:0}section{border:1px solid #ccc;border-radius:6px;padding:.8em 1em;margin:1em 0}' +
  'th{text-align:left;font-weight:normal;color:#555;padding-right:1.5em}td,th{padding-top:.1em;vertical-align:top}' +
  '.state{font-size:.8em;padding:.1em .5em;border-radius:4px;margin-left:.4em;background:#eee}.s-ready{background:#dff0d8}' +
  '.s-starting,.s-restarting{background:#fff3cd}.s-errored{background:#f8d7da}ul,ol{margin:0;padding-left:1.2em}' +
  'code{font-size:.95em;word-break:break-all}.problems li{font-family:ui-monospace,monospace;font-size:.85em;word-break:break-word}' +
  '.error{color:#a00}.warn{color:#8a6100}.none{color:#555;margin:0}';
const STATUS_CSS_HASH = `'sha256-${createHash('sha256').update(STATUS_CSS).digest('base64')}'`;
const STATUS_HEADERS: Readonly<Record<string, string>> = {
  'Content-Type': 'text/html; charset=utf-8',
  'Content-Security-Policy': `default-src 'none'; style-src ${STATUS_CSS_HASH}; frame-ancestors 'none'; base-uri 'none'; form-action 'none'`,
  'X-Frame-Options': 'DENY',
  'X-Content-Type-Options': 'nosniff',
  'Referrer-Policy': 'no-referrer',
  'Cache-Control': 'no-store',
};

/** Every value on the page goes through escapeHtml: names, URLs and log lines may hold anything. */
function statusPage(proxy: Proxy, now: number): string {
  const root = rootServer(proxy);
  const sections = [...proxy.servers.values()].map((server) => serverSection(server, serverUrls(server === root, proxy.options, proxy.url, server.segment), now));
  const count = `${proxy.servers.size} server${proxy.servers.size === 1 ? '' : 's'}`;
  return '<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">' +
    `<meta http-equiv="refresh" content="${STATUS_REFRESH_S}"><title>${PROXY_NAME}: status</title><style>${STATUS_CSS}</style></head><body>` +
    `<h1>${PROXY_NAME}</h1><p class="meta">version ${PROXY_VERSION} · up ${formatDuration(process.uptime() * 1000)} · ${count} · ` +
    `${new Date(now).toISOString().slice(0, 19)}Z, refreshed every ${STATUS_REFRESH_S} s</p>${sections.join('')}</body></html>`;
}

function serverSection(server: ServerRuntime, urls: readonly string[], now: number): string {
  const { stats, config } = server;
  const state = serverState(server);
  const up = server.shared;
  const uptime = up ? (up.proc && up.state === 'ready' ? formatDuration(now - up.startedAtMs) : '–') : `per session: ${server.upstreams.size} running`;
  const exit = stats.lastExitAtMs ? `${stats.lastExitReason}, ${clockTime(stats.lastExitAtMs)}` : 'none';
  let streamable = 0;
  for (const session of server.sessions.values()) if (session.transport === 'streamable') streamable++;
  const problems = stats.problems.length
    ? `<ol class="problems">${stats.problems.map((p) => `<li><span class="${p.level}">${clockTime(p.atMs)} ${p.level}</span> ${escapeHtml(p.text)}</li>`).join('')}</ol>`
    : '<p class="none">none</p>';
  const row = (name: string, cls: string, value: string) => `<tr><th>${name}</th><td class="${cls}">${escapeHtml(value)}</td></tr>`;
  return `<section data-server="${escapeHtml(config.name)}"><h2>${escapeHtml(config.name)}<span class="state s-${state}">${state}</span></h2><table>` +
    row('Uptime', 'uptime', uptime) + row('Restarts', 'restarts', String(stats.restarts)) + row('Last exit', 'exit', exit) +
    row('Sessions', 'sessions', `${streamable} Streamable HTTP, ${server.sessions.size - streamable} SSE`) +
    `</table><h3>URLs</h3><ul class="urls">${urls.map((url) => `<li><code>${escapeHtml(url)}</code></li>`).join('')}</ul>` +
    `<h3>Recent problems</h3>${problems}</section>`;
}

/** 45 s, 3 min 20 s, 5 h 02 min, 2 d 3 h. */
function formatDuration(ms: number): string {
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86_400) return `${Math.floor(s / 3600)} h ${String(Math.floor(s / 60) % 60).padStart(2, '0')} min`;
  return `${Math.floor(s / 86_400)} d ${Math.floor(s / 3600) % 24} h`;
}

function clockTime(ms: number): string {
  return `${new Date(ms).toISOString().slice(11, 19)} UTC`;
}

// ── 12. Lifecycle: start, reload, shutdown ──────────────────────────────────────────────────────────────

/** What `startProxy` returns: the running proxy's handle for main() and the tests. */
export type RunningProxy = {
  port: number;
  url: string;
  /** Resolves when every shared child has answered initialize; rejects if one errored or on timeout. */
  ready(timeoutMs?: number): Promise<void>;
  status(): Record<string, ServerStatus>;
  /**
   * Idempotent: stops accepting, ends streams, stops every child group; resolves when all is done. With
   * `drain`, requests in flight first get up to limits.drainGraceMs to be answered (SIGTERM does this).
   */
  close(options?: { drain?: boolean }): Promise<void>;
  /**
   * Applies a new config, or re-reads options.configPath: only the difference (diffConfigs). Resolves with
   * the diff once stopped servers' children are gone; null when the file was refused (logged) or the proxy is
   * closing. A config given here that is invalid throws (ProxyError SEGMENT_CLASH).
   */
  reload(config?: Config): Promise<ConfigDiff | null>;
  /** Opens the --audit-log file again (SIGUSR1, after logrotate moved it); no-op without one. */
  reopenAuditLog(): void;
};

export type ServerStatus = { state: ServerState; pid: number | null; pids: number[]; restarts: number; sessions: number };

export type StartOptions = Partial<Options> & {
  limits?: Partial<Limits>;
  log?: Logger;
  /** Tests only: stands in for the guarded https fetch of client ID metadata documents. */
  fetchClientMetadata?: MetadataFetcher;
};

/** Every proxy started and not yet closed, for the crash handler (killAllChildGroups). */
const LIVE_PROXIES = new Set<Proxy>();

export async function startProxy(config: Config, start: StartOptions = {}): Promise<RunningProxy> {
  const options: Options = { ...defaultOptions(), ...stripUndefined(start) };
  const concurrency = options.startConcurrency === undefined ? {} : { startConcurrency: options.startConcurrency };
  const limits = validateLimits({ ...DEFAULT_LIMITS, ...concurrency, ...start.limits });
  const weak = tokenProblem(options.tokens);
  if (weak) throw new ProxyError('WEAK_TOKEN', weak);
  const clashes = segmentClashes(config.servers);
  if (clashes.length) throw new ProxyError('SEGMENT_CLASH', clashes.join('; '));
  const loopbackBind = isLoopbackHost(options.host);
  const log = start.log ?? createLogger(options.logLevel, writeStderr, options.logFormat);
  const oauth = startOAuth(options, log, limits, start.fetchClientMetadata);
  if (!loopbackBind && options.tokens.length === 0 && !oauth && !options.allowUnauthenticated) {
    throw new ProxyError('UNAUTHENTICATED_PUBLIC_BIND',
      `refusing to serve without authentication on ${options.host}, which is not a loopback address: set a token ` +
      '(--token, --token-file, MCP_PROXY_TOKEN or MCP_PROXY_TOKEN_FILE) or a consent passphrase for OAuth (MCP_PROXY_PASSWORD ' +
      'with --public-url), bind 127.0.0.1, or accept the risk with ' +
      '--allow-unauthenticated (MCP_PROXY_ALLOW_UNAUTHENTICATED=1)');
  }
  const tls = options.tlsCert === undefined && options.tlsKey === undefined ? null : readTlsPair(options.tlsCert, options.tlsKey);
  const serverOptions: http.ServerOptions = {
    requestTimeout: limits.httpRequestTimeoutMs, headersTimeout: limits.headersTimeoutMs,
    keepAliveTimeout: limits.keepAliveTimeoutMs, connectionsCheckingInterval: limits.connectionsCheckIntervalMs,
  };
  const servers = new Map<string, ServerRuntime>();
  const proxy: Proxy = {
    options, limits, log: recordingProblems(safeLogger(log, () => proxy.secrets), servers, (text) => escapeControl(maskSecrets(text, proxy.secrets))), servers,
    // A TLS handshake comes before the headers: one that stalls gets no longer than they would (slowloris).
    http: tls ? https.createServer({ ...serverOptions, ...tls, handshakeTimeout: limits.headersTimeoutMs }) : http.createServer(serverOptions),
    state: 'RUNNING', streams: new Set(), timers: [], startQueue: [], starting: 0,
    tokens: options.tokens.map(sha256), oauth, publicUrl: oauth?.publicUrl ?? (options.publicUrl ? new URL(options.publicUrl) : null), trustedProxies: trustList(options.trustProxy), loopbackBind,
    allowedHosts: new Set([
      ...LOOPBACK_HOSTNAMES, hostnameOf(options.host.includes(':') ? `[${options.host}]` : options.host),
      ...(oauth ? [oauth.publicUrl.hostname] : []),
    ]),
    connections: new Set(), backlogged: new Set(), maxConnections: connectionCap(limits.maxConnections), bodyBytesInFlight: 0, heldAnswerBytes: 0,
    groups: new Map(), continuations: new Map(), stateKey: null, secrets: secretsOf(options, config.servers), watcher: null,
    removed: new Set(), auditFd: options.auditLog === undefined ? null : openAuditLog(options.auditLog), rootName: config.servers.length === 1 ? config.servers[0].name : null, retiring: new Set(), lastReload: '', refusedFiles: [], url: '', stopTlsWatch: null, closed: null,
  };
  if (oauth) oauth.audit = (fields) => audit(proxy, fields);
  proxy.http.maxHeadersCount = limits.maxHeadersCount;
  if (proxy.maxConnections < FEW_CONNECTIONS) {
    proxy.log.warn('proxy', `only ${proxy.maxConnections} client connections fit under this process's file-descriptor limit; raise it (ulimit -n)`);
  }
  proxy.http.on('connection', (socket: Socket) => onConnection(proxy, socket));
  proxy.http.on('request', (req, res) => serveRequest(proxy, req, res));
  try {
    await listen(proxy.http, options.host, options.port);
  } catch (err) {
    if (proxy.auditFd !== null) closeSync(proxy.auditFd);
    throw err;
  }
  const port = (proxy.http.address() as { port: number }).port;
  proxy.url = `${tls ? 'https' : 'http'}://${options.host.includes(':') ? `[${options.host}]` : options.host}:${port}`;
  if (tls) proxy.stopTlsWatch = watchTlsFiles(proxy, proxy.http as https.Server, options.tlsCert!, options.tlsKey!, tls);
  LIVE_PROXIES.add(proxy);
  for (const server of config.servers) addServer(proxy, server);
  if (options.watchConfig) {
    proxy.watcher = createDirWatcher(proxy, () => void reloadFromFile(proxy, false).catch((err) => {
      proxy.log.error('config', `reload failed: ${describeError(err)}`);
    }));
    rewatch(proxy);
  }
  proxy.timers.push(
    setInterval(() => guarded(proxy, 'proxy', 'the sweep', () => sweep(proxy)), limits.sweepIntervalMs),
    setInterval(() => guarded(proxy, 'proxy', 'keep-alives', () => keepalive(proxy)), limits.sseKeepaliveMs),
  );
  for (const timer of proxy.timers) timer.unref();
  return {
    port,
    url: proxy.url,
    ready: (timeoutMs = limits.initTimeoutMs) => waitReady(proxy, timeoutMs),
    status: () => statusOf(proxy),
    reload: (next) => (next ? applyConfig(proxy, next) : reloadFromFile(proxy)),
    reopenAuditLog: () => reopenAuditLog(proxy),
    close: (options) => closeProxy(proxy, options?.drain ?? false),
  };
}

/**
 * The OAuth server, when the operator set a passphrase. It needs the public URL (never derived from Host or
 * X-Forwarded-*: a client controls those) and a writable state directory; without them start-up stops.
 */
function startOAuth(options: Options, log: Logger, limits: Limits, fetchMetadata?: MetadataFetcher): OAuth | null {
  if (options.passphrase === undefined) return null;
  if (!options.publicUrl) {
    throw new ProxyError('PUBLIC_URL', 'OAuth (MCP_PROXY_PASSWORD is set) needs the public URL clients reach this proxy at: set --public-url https://mcp.example.com (MCP_PROXY_PUBLIC_URL)');
  }
  if (!options.passphrase.startsWith(SCRYPT_PREFIX) && options.passphrase.length < MIN_PASSPHRASE_CHARS) {
    throw new ProxyError('PASSPHRASE', `MCP_PROXY_PASSWORD: a passphrase needs at least ${MIN_PASSPHRASE_CHARS} characters (or an scrypt hash from \`hash-password\`)`);
  }
  if (options.oauthClient && options.oauthClient.secret.length < MIN_TOKEN_CHARS) {
    throw new ProxyError('WEAK_TOKEN', `MCP_PROXY_OAUTH_CLIENT_SECRET: needs at least ${MIN_TOKEN_CHARS} characters`);
  }
  const settings: OAuthSettings = {
    publicUrl: options.publicUrl, baseDomain: options.baseDomain, passphrase: options.passphrase, stateDir: options.stateDir,
    preRegistered: options.oauthClient, metadataHosts: options.clientMetadataHosts, fetchMetadata: fetchMetadata ?? fetchClientMetadata,
  };
  return createOAuth(settings, safeLogger(log, () => [options.passphrase!, ...(options.oauthClient ? [options.oauthClient.secret] : [])]), limits);
}

/** Every limit is a positive integer: 0 or NaN would disable a bound, or trip it on every request. */
function validateLimits(limits: Limits): Limits {
  const problem = (text: string) => new ProxyError('INVALID_LIMIT', text);
  for (const [name, value] of Object.entries(limits)) {
    if (!(name in DEFAULT_LIMITS)) throw problem(`limits.${name}: unknown limit`);
    if (!Number.isSafeInteger(value) || value <= 0) {
      throw problem(`limits.${name}: got ${typeof value === 'number' ? String(value) : typeName(value)}, expected a positive integer`);
    }
    // Node's timers take at most 2^31 - 1 ms and turn anything larger into 1 ms.
    if (TIMER_LIMITS.has(name) && value > MAX_TIMER_MS) throw problem(`limits.${name}: got ${value}, expected at most ${MAX_TIMER_MS} ms`);
  }
  if (limits.maxBodyBytes > limits.maxBodyBytesInFlight) {
    throw problem(`limits.maxBodyBytes (${limits.maxBodyBytes}) is larger than limits.maxBodyBytesInFlight (${limits.maxBodyBytesInFlight}): such a body could never be read`);
  }
  if (limits.headersTimeoutMs > limits.httpRequestTimeoutMs) {
    throw problem(`limits.headersTimeoutMs (${limits.headersTimeoutMs}) is longer than limits.httpRequestTimeoutMs (${limits.httpRequestTimeoutMs})`);
  }
  return limits;
}

/** --trust-proxy entries (an address, or a CIDR range) as a BlockList; an invalid one stops start-up. */
function trustList(entries: readonly string[]): BlockList | null {
  if (entries.length === 0) return null;
  const list = new BlockList();
  for (const entry of entries) {
    const [address, bits] = entry.split('/');
    const family = isIP(address);
    const prefix = bits === undefined ? (family === 6 ? 128 : 32) : Number(bits);
    if (family === 0 || !Number.isInteger(prefix) || prefix < 0 || prefix > (family === 6 ? 128 : 32)) {
      throw new ProxyError('TRUST_PROXY', `--trust-proxy: got ${JSON.stringify(entry)}, expected an IP address or a CIDR range such as 172.16.0.0/12`);
    }
    list.addSubnet(address, prefix, family === 6 ? 'ipv6' : 'ipv4');
  }
  return list;
}

/** Why the static tokens cannot be used, or null. Never quotes a token. */
function tokenProblem(tokens: readonly string[]): string | null {
  const short = tokens.filter((token) => token.length < MIN_TOKEN_CHARS).length;
  if (short) {
    return `${short} of ${tokens.length} bearer tokens ${short === 1 ? 'is' : 'are'} shorter than ${MIN_TOKEN_CHARS} characters; ` +
      'use a long random one (e.g. `openssl rand -hex 32`)';
  }
  // A token is one word of visible ASCII (RFC 6750 §2.1 b64token): one with a space could never be sent.
  const unusable = tokens.filter((token) => !/^[\x21-\x7e]+$/.test(token)).length;
  if (unusable) return `${unusable} of ${tokens.length} bearer tokens hold spaces or characters outside visible ASCII, so no client could send them`;
  return null;
}

/**
 * maxConnections, lowered to leave FD_RESERVE descriptors free under the process's limit (Node raises the soft
 * limit to the hard one at start; /proc is read because Node has no getrlimit). Unknown limit: as configured.
 */
function connectionCap(maxConnections: number): number {
  let soft = Infinity;
  try {
    const line = readBounded('/proc/self/limits', MAX_SECRET_FILE_BYTES).split('\n').find((l) => l.startsWith('Max open files'));
    const value = line ? Number(line.split(/\s{2,}/)[1]) : NaN;
    if (Number.isFinite(value)) soft = value;
  } catch {
    // Not Linux (no /proc): the configured cap stands alone.
  }
  return Math.max(1, Math.min(maxConnections, soft - FD_RESERVE));
}

function defaultOptions(): Options {
  return {
    configPath: DEFAULT_CONFIG_PATH, host: DEFAULT_HOST, port: DEFAULT_PORT, tokens: [], allowUnauthenticated: false,
    allowedOrigins: [], corsOrigins: [], logLevel: 'info', logFormat: 'text', packagesDir: undefined,
    publicUrl: undefined, baseDomain: undefined, passphrase: undefined, stateDir: defaultStateDir(process.env), oauthClient: undefined,
    clientMetadataHosts: [], trustProxy: [], strictProtocolHeader: false, watchConfig: false, auditLog: undefined, tlsCert: undefined, tlsKey: undefined,
    startConcurrency: undefined,
  };
}

/** $XDG_STATE_HOME/remote-mcp-proxy, else ~/.local/state/remote-mcp-proxy (the image sets /data). */
function defaultStateDir(env: Env): string {
  if (env.XDG_STATE_HOME) return join(env.XDG_STATE_HOME, PROXY_NAME);
  return join(env.HOME || homedir(), '.local', 'state', PROXY_NAME);
}

function stripUndefined(start: StartOptions): Partial<Options> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(start)) {
    if (value !== undefined && key !== 'limits' && key !== 'log' && key !== 'fetchClientMetadata') out[key] = value;
  }
  const options = out as Partial<Options>;
  if (options.allowedOrigins) options.allowedOrigins = options.allowedOrigins.map(normalizeOrigin);
  if (options.corsOrigins) options.corsOrigins = options.corsOrigins.map(normalizeOrigin);
  if (options.baseDomain) options.baseDomain = options.baseDomain.toLowerCase();
  return options;
}

function normalizeOrigin(origin: string): string {
  return origin.trim().toLowerCase().replace(/\/$/, '');
}

function isLoopbackHost(host: string): boolean {
  if (host === 'localhost' || host === '::1') return true;
  return isIP(host) === 4 && host.startsWith('127.');
}

type TlsPair = { cert: string; key: string };

/**
 * The certificate chain and private key, read (bounded) and checked: each parses and the key belongs to the
 * first certificate. A ProxyError names the file and the problem, never the contents or OpenSSL's text.
 */
export function readTlsPair(certPath: string | undefined, keyPath: string | undefined, readFile: ReadFile = readUtf8): TlsPair {
  const fail = (text: string) => new ProxyError('TLS', text);
  if (!certPath || !keyPath) throw fail('TLS needs both --tls-cert and --tls-key (MCP_PROXY_TLS_CERT, MCP_PROXY_TLS_KEY), or neither');
  const read = (flag: string, path: string) => {
    try {
      return readFile(path, MAX_PEM_FILE_BYTES);
    } catch (err) {
      throw fail(`${flag} ${JSON.stringify(path)}: cannot read (${readFailure(err)})`);
    }
  };
  const cert = read('--tls-cert', certPath);
  const key = read('--tls-key', keyPath);
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(cert);
  } catch {
    throw fail(`--tls-cert ${JSON.stringify(certPath)}: not a PEM certificate`);
  }
  let privateKey;
  try {
    privateKey = createPrivateKey(key);
  } catch {
    throw fail(`--tls-key ${JSON.stringify(keyPath)}: not a PEM private key (or one encrypted with a passphrase)`);
  }
  if (!leaf.checkPrivateKey(privateKey)) throw fail(`--tls-key ${JSON.stringify(keyPath)}: does not match the certificate in ${JSON.stringify(certPath)}`);
  try {
    createSecureContext({ cert, key });
  } catch (err) {
    throw fail(`--tls-cert ${JSON.stringify(certPath)}: OpenSSL refuses the pair (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  return { cert, key };
}

/**
 * Re-reads the certificate and key when their directories change, and serves a new valid pair to new
 * connections (server.setSecureContext, https://nodejs.org/api/tls.html#serversetsecurecontextoptions);
 * connections already open keep the context they were made with. A bad pair (a half-done renewal) is logged
 * in one line and the old one keeps serving. The directories are watched, not the files: certbot swaps
 * live/ symlinks, Kubernetes swaps its ..data link and editors rename over a file, and a watch on the old
 * inode goes silent (https://nodejs.org/api/fs.html#inodes). Any event there triggers a re-read, since the
 * name in it may be a link's (..data) rather than the file's; an unchanged pair is not re-applied.
 * Not handled: the directory itself replaced (watch its parent's path instead: mount the parent).
 */
function watchTlsFiles(proxy: Proxy, server: https.Server, certPath: string, keyPath: string, initial: TlsPair): () => void {
  let serving = initial;
  let timer: NodeJS.Timeout | null = null;
  let failed = '';
  const reload = () => {
    timer = null;
    let next: TlsPair;
    try {
      next = readTlsPair(certPath, keyPath);
    } catch (err) {
      // Logged once per problem; retried by the clock too, since what fixes it may happen elsewhere (a deploy
      // hook that makes the key readable acts in certbot's archive/, which is not watched).
      const line = `TLS not reloaded, the previous certificate keeps serving: ${(err as Error).message}`;
      line === failed ? proxy.log.debug('proxy', line) : proxy.log.error('proxy', line);
      failed = line;
      timer = setTimeout(() => guarded(proxy, 'proxy', 'a certificate reload', reload), proxy.limits.tlsRetryMs);
      timer.unref();
      return;
    }
    failed = '';
    if (next.cert === serving.cert && next.key === serving.key) return;
    server.setSecureContext(next);
    serving = next;
    proxy.log.info('proxy', `TLS certificate reloaded from ${certPath} (valid until ${new X509Certificate(next.cert).validTo})`);
  };
  // The same watcher as the config's: events naming the files (or `..data`) in their directories, debounced.
  // Only the directories the paths name: what changes in a symlink's target (archive/) is the retry's to see.
  const watcher = createDirWatcher(proxy, () => {
    if (timer) clearTimeout(timer); // a retry pending: this reload replaces it
    reload();
  }, { scope: 'proxy', debounceMs: TLS_RELOAD_DEBOUNCE_MS, unseen: 'certificate renewals there need a restart' });
  const paths = [certPath, keyPath];
  watcher.watch([...new Set(paths.map((path) => dirname(resolvePath(path))))], new Set(paths.flatMap(watchedNames)));
  return () => {
    if (timer) clearTimeout(timer);
    watcher.close();
  };
}

function listen(server: http.Server, host: string, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException) =>
      reject(new ProxyError('LISTEN_FAILED', `cannot listen on ${host}:${port}: ${err.code ?? err.message}`));
    server.once('error', onError);
    server.listen(port, host, () => {
      server.off('error', onError);
      resolve();
    });
  });
}

/** Adds one server to the table and starts its shared child; the others are untouched (reload adds diffs). */
function addServer(proxy: Proxy, config: ServerConfig, after?: Promise<void>): void {
  const launch = resolveBakedPackage(config, proxy.options.packagesDir) ?? { command: config.command, args: config.args };
  if (launch.command !== config.command) proxy.log.info(config.name, `npx package baked into ${proxy.options.packagesDir}: running ${launch.args[0]}`);
  const segment = serverSegment(config.name);
  const server: ServerRuntime = {
    proxy, config, segment, launch, sessions: new Map(), shared: null, upstreams: new Set(), windingDown: new Set(), stats: newServerStats(),
    sessionsByCredential: new Map(), buckets: new Map(),
  };
  proxy.servers.set(segment, server);
  if (config.sessions !== 'shared') return;
  const up = newUpstream(server);
  server.shared = up;
  server.upstreams.add(up);
  if (after) void after.then(() => requestStart(up));
  else requestStart(up);
}

/** Removes one server: its sessions end (requests in flight get an error saying why) and its children stop. */
async function removeServer(proxy: Proxy, segment: string, why: StopReason): Promise<void> {
  const server = proxy.servers.get(segment);
  if (!server) return;
  proxy.servers.delete(segment);
  const upstreams = [...server.upstreams];
  for (const session of [...server.sessions.values()]) endSession(session, why);
  for (const up of upstreams) endListeners(up);
  await Promise.all(upstreams.map((up) => stopUpstream(up, why)));
}

// Reload ───────

/**
 * SIGHUP, a change in a watched directory, or RunningProxy.reload(): the whole file is loaded and validated
 * first. An invalid one changes nothing: one log line (the file, the server, the field, the problem; never a
 * value) and the old config keeps serving.
 */
async function reloadFromFile(proxy: Proxy, asked = true): Promise<ConfigDiff | null> {
  if (proxy.state !== 'RUNNING') return null;
  const path = proxy.options.configPath;
  const loaded = loadConfigFile(path);
  // What this attempt says; a watched reload that would say the same again says it at debug (a log file
  // written next to the config must not make every write a new line about it).
  const said = [...loaded.errors, ...loaded.warnings].join('\n');
  const repeat = !asked && said === proxy.lastReload;
  proxy.lastReload = said;
  if (!loaded.config) {
    const line = `reload refused, still serving the previous config: ${loaded.errors.join('; ')}`;
    repeat ? proxy.log.debug('config', line) : proxy.log.error('config', line);
    // Secret files the refused config names are watched too (until a reload succeeds): the one not written yet
    // fixes it when it comes.
    proxy.refusedFiles = loaded.files ?? [];
    rewatch(proxy);
    return null;
  }
  for (const warning of loaded.warnings) repeat ? proxy.log.debug('config', warning) : proxy.log.warn('config', warning);
  proxy.refusedFiles = [];
  return applyConfig(proxy, loaded.config);
}

/** The watch set: the config file, the running servers' secret files, and those a refused config names. */
function rewatch(proxy: Proxy): void {
  if (!proxy.watcher) return;
  const paths = [...watchedPaths(proxy), ...proxy.refusedFiles];
  proxy.watcher.watch(watchedDirs(paths), new Set(paths.flatMap(watchedNames)));
}

/**
 * Applies only the difference, through the server table: removed servers stop, changed ones restart, added
 * ones start, updated ones take their new settings in place; unchanged servers keep their children and
 * sessions. The table changes at once (requests meanwhile see either the old server or the new one); the
 * returned promise waits for the stopped children.
 */
async function applyConfig(proxy: Proxy, config: Config): Promise<ConfigDiff | null> {
  if (proxy.state !== 'RUNNING') return null;
  const clashes = segmentClashes(config.servers);
  if (clashes.length) throw new ProxyError('SEGMENT_CLASH', clashes.join('; '));
  const before = [...proxy.servers.values()].map((server) => server.config);
  const diff = diffConfigs({ servers: before }, config);
  // Unchanged servers take the new objects too: equal in all that runs, but a secret may now come from
  // another file (secretFiles), which must be watched.
  for (const server of diff.unchanged) proxy.servers.get(serverSegment(server.name))!.config = server;
  if (isEmptyDiff(diff)) {
    rewatch(proxy);
    proxy.log.debug('config', 'reload: nothing changed');
    return diff;
  }
  const retiring = [...diff.removed, ...diff.changed.map((c) => before.find((b) => b.name === c.config.name)!)];
  for (const server of retiring) proxy.retiring.add(server);
  // The old secrets stay masked while the children that had them wind down.
  proxy.secrets = secretsOf(proxy.options, [...config.servers, ...proxy.retiring]);
  // By segment: a server renamed only in case is a removal and an addition at the same URL.
  const stops = new Map<string, Promise<void>>();
  for (const server of diff.removed) stops.set(serverSegment(server.name), removeServer(proxy, serverSegment(server.name), 'removed from the config'));
  for (const { config: server } of diff.changed) stops.set(serverSegment(server.name), removeServer(proxy, serverSegment(server.name), 'its config changed'));
  for (const server of diff.removed) rememberRemoved(proxy, serverSegment(server.name));
  for (const server of diff.updated) updateServer(proxy.servers.get(serverSegment(server.name))!, server);
  // A changed server's new child starts once the old one has exited: two processes of one server at once could
  // fight over its database or port.
  for (const server of [...diff.changed.map((c) => c.config), ...diff.added]) {
    proxy.removed.delete(serverSegment(server.name));
    addServer(proxy, server, stops.get(serverSegment(server.name)));
  }
  rewatch(proxy);
  repinRoot(proxy);
  logReload(proxy, config, diff);
  await Promise.all(stops.values());
  for (const server of retiring) proxy.retiring.delete(server);
  proxy.secrets = secretsOf(proxy.options, [...[...proxy.servers.values()].map((server) => server.config), ...proxy.retiring]);
  return diff;
}

/** Settings read as they are used take effect at once; a new readOnly policy needs the child's annotations. */
function updateServer(server: ServerRuntime, config: ServerConfig): void {
  const toolsChanged = changedFields('tools', server.config.tools, config.tools).length > 0;
  server.config = config;
  for (const up of server.upstreams) {
    if (up.state !== 'ready') continue;
    if (config.tools?.readOnly) refreshToolHints(up);
    // Clients list again: what they may see changed (as if the child had said so; 2026-07-28 listeners too).
    if (toolsChanged) routeChildNotification(up, TOOLS_LIST_CHANGED, JSON.stringify(TOOLS_LIST_CHANGED));
  }
}

const TOOLS_LIST_CHANGED: JsonRpcMessage = { jsonrpc: '2.0', method: 'notifications/tools/list_changed' };

/** The root route stays with its server; once that is gone, it goes to the only server left, if one is. */
function repinRoot(proxy: Proxy): void {
  const name = proxy.rootName;
  if (name !== null && rootServer(proxy)) return;
  const next = proxy.servers.size === 1 ? [...proxy.servers.values()][0].config.name : null;
  proxy.rootName = next;
  if (name !== null) proxy.log.warn('config', `the root route (/mcp, /sse) served ${JSON.stringify(name)}, which is gone: ${next === null ? 'it answers 404 now' : `it serves ${JSON.stringify(next)} now`}`);
  else if (next !== null) proxy.log.info('config', `the root route (/mcp, /sse) serves ${JSON.stringify(next)}, the only server`);
}

function isEmptyDiff(diff: ConfigDiff): boolean {
  return !diff.added.length && !diff.removed.length && !diff.changed.length && !diff.updated.length;
}

function rememberRemoved(proxy: Proxy, segment: string): void {
  if (proxy.removed.size >= MAX_REMOVED_REMEMBERED) proxy.removed.delete(proxy.removed.values().next().value!);
  proxy.removed.add(segment);
}

/** One line for the whole reload, and the URLs of each server that started. */
function logReload(proxy: Proxy, config: Config, diff: ConfigDiff): void {
  const names = (servers: readonly ServerConfig[]) => servers.map((server) => JSON.stringify(server.name)).join(', ');
  const parts = [
    ...(diff.added.length ? [`started ${names(diff.added)}`] : []),
    ...(diff.removed.length ? [`stopped ${names(diff.removed)}`] : []),
    ...diff.changed.map(({ config: server, fields }) => `restarted ${JSON.stringify(server.name)} (${fields.join(', ')} changed)`),
    ...(diff.updated.length ? [`updated ${names(diff.updated)} in place`] : []),
    `${diff.unchanged.length} unchanged`,
  ];
  proxy.log.info('config', `reloaded ${proxy.options.configPath}: ${parts.join('; ')}`);
  for (const server of [...diff.added, ...diff.changed.map((c) => c.config)]) {
    const root = rootServer(proxy)?.config.name === server.name;
    proxy.log.info(server.name, `serving at ${serverUrls(root, proxy.options, proxy.url, serverSegment(server.name)).join('  ')}`);
  }
}

/** What the log masks: the static credentials and every secret the given servers' `${…}` expanded. */
function secretsOf(options: Options, servers: readonly ServerConfig[]): readonly string[] {
  return [...new Set([
    ...servers.flatMap((server) => server.secrets), ...options.tokens,
    ...(options.passphrase ? [options.passphrase] : []), ...(options.oauthClient ? [options.oauthClient.secret] : []),
  ])];
}

/** The config file and every secret file the running servers read. */
function watchedPaths(proxy: Proxy): string[] {
  return [proxy.options.configPath, ...[...proxy.servers.values()].flatMap((server) => server.config.secretFiles ?? [])];
}

/** The names an event in a watched directory may carry for `path` to have changed. */
function watchedNames(path: string): string[] {
  // Kubernetes swaps a volume's `..data` link; a file reached through a symlink changes under its target's name.
  const names = [basename(path), '..data'];
  try {
    names.push(basename(realpathSync(path)));
  } catch {
    // Missing for now: its own name is enough.
  }
  return names;
}

/**
 * fs.watch on directories, by hand (no chokidar). An event naming the config, a secret file, `..data` or the
 * directory itself (deleted or replaced), or naming nothing (the platform did not say), schedules a reload
 * after CONFIG_DEBOUNCE_MS of quiet, and at most CONFIG_MAX_WAIT_MS after the first event: other files in the
 * same directory (a log, a database) neither reload nor hold a reload back. The reload re-reads and diffs, so
 * an event that changed nothing changes nothing. A directory deleted or replaced since it was watched (an
 * event naming it, or its inode differs: inotify stays on the old one) is watched again at the next `watch()`:
 * every reload and every sweep.
 */
const CONFIG_WATCH: DirWatchOptions = { scope: 'config', debounceMs: CONFIG_DEBOUNCE_MS, unseen: 'send SIGHUP to reload after a change there' };

function createDirWatcher(proxy: Proxy, onChange: () => void, o: DirWatchOptions = CONFIG_WATCH): DirWatcher {
  const watchers = new Map<string, { watcher: FSWatcher; ino: number }>();
  let names: ReadonlySet<string> = new Set();
  let timer: NodeJS.Timeout | null = null;
  let firstEventMs = 0;
  const fire = () => {
    timer = null;
    firstEventMs = 0;
    guarded(proxy, o.scope, `a reload (${o.scope})`, onChange);
  };
  const changed = (dir: string, name: string | Buffer | null) => {
    const file = name === null ? null : String(name);
    // The directory itself was deleted or moved: this watch is on a dead inode (and a directory made again at
    // once may get the same inode number, so the inode check below cannot tell). Re-armed by the next watch().
    if (file === basename(dir)) unwatch(dir);
    else if (file !== null && !names.has(file)) return;
    if (timer) clearTimeout(timer);
    const now = Date.now();
    if (firstEventMs === 0) firstEventMs = now;
    timer = setTimeout(fire, Math.max(0, Math.min(o.debounceMs, firstEventMs + CONFIG_MAX_WAIT_MS - now)));
  };
  const unwatch = (dir: string) => {
    watchers.get(dir)?.watcher.close();
    watchers.delete(dir);
  };
  const inodeOf = (dir: string) => {
    try {
      return statSync(dir).ino;
    } catch {
      return -1;
    }
  };
  return {
    watch(all, watchedFileNames) {
      names = watchedFileNames;
      const dirs = all.slice(0, MAX_WATCHED_DIRS);
      if (all.length > dirs.length) {
        proxy.log.warn('config', `${all.length} directories hold the config and its secret files; watching the first ${MAX_WATCHED_DIRS}: send SIGHUP after changing the others`);
      }
      for (const dir of [...watchers.keys()]) if (!dirs.includes(dir) || watchers.get(dir)!.ino !== inodeOf(dir)) unwatch(dir);
      for (const dir of dirs) {
        if (watchers.has(dir)) continue;
        const ino = inodeOf(dir);
        if (ino === -1) continue; // not there (yet): the next watch() tries again
        try {
          const watcher = watch(dir, (_event, name) => changed(dir, name));
          watcher.on('error', () => unwatch(dir)); // re-armed by the next watch()
          watchers.set(dir, { watcher, ino });
        } catch (err) {
          proxy.log.warn(o.scope, `cannot watch ${JSON.stringify(dir)} (${readFailure(err)}); ${o.unseen}`);
        }
      }
    },
    close() {
      if (timer) clearTimeout(timer);
      for (const dir of [...watchers.keys()]) unwatch(dir);
    },
  };
}

/** The single periodic sweep: idle Streamable sessions expire and overdue requests are answered. */
function sweep(proxy: Proxy): void {
  const now = Date.now();
  for (const server of proxy.servers.values()) {
    const idleMs = idleTimeoutOf(server);
    for (const session of [...server.sessions.values()]) {
      if (now - session.lastActiveMs < idleMs) break; // the map is in activity order
      if (session.transport !== 'streamable' || !isIdle(session)) continue;
      endSession(session, 'idle');
    }
    for (const up of server.upstreams) expireRequests(up, now);
  }
  if (proxy.oauth) sweepOAuth(proxy.oauth, proxy.limits, now);
  rewatch(proxy); // a watched directory replaced meanwhile is watched again
}

/** A request the child has not answered in requestTimeoutMs: the client gets an error, the child a cancel. */
function expireRequests(up: Upstream, now: number): void {
  const timeoutMs = up.server.config.requestTimeoutMs ?? up.server.proxy.limits.requestTimeoutMs;
  for (const [childId, pending] of up.pending) {
    // The proxy's own requests (initialize, the readOnly tool list, re-subscriptions) are bounded by the start
    // timeout or by nothing waiting on them; timing one out here would leave its caller waiting for good.
    if (now - pending.sentAtMs < timeoutMs || !pending.session) continue;
    abortPending(up, childId, pending, 'timeout', REQUEST_TIMEOUT, 'Request timed out');
  }
}

function keepalive(proxy: Proxy): void {
  for (const stream of proxy.streams) if (!stream.closed) stream.res.write(KEEPALIVE_COMMENT);
}

async function waitReady(proxy: Proxy, timeoutMs: number): Promise<void> {
  const shared = [...proxy.servers.values()].flatMap((server) => (server.shared ? [server.shared] : []));
  const all = Promise.all(shared.map(whenSettled));
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<'timeout'>((resolve) => (timer = setTimeout(resolve, timeoutMs, 'timeout')));
  const outcome = await Promise.race([all, timeout]);
  clearTimeout(timer);
  const notReady = shared.filter((up) => up.state !== 'ready').map((up) => `${up.server.config.name} (${up.state})`);
  if (outcome === 'timeout' || notReady.length) throw new ProxyError('NOT_READY', `servers not ready: ${notReady.join(', ')}`);
}

function statusOf(proxy: Proxy): Record<string, ServerStatus> {
  const out: Record<string, ServerStatus> = {};
  for (const server of proxy.servers.values()) {
    const name = server.config.name;
    const ups = [...server.upstreams];
    const pids = ups.flatMap((up) => (up.proc?.pid ? [up.proc.pid] : []));
    out[name] = {
      state: serverState(server),
      pid: server.shared?.proc?.pid ?? null,
      pids,
      restarts: ups.reduce((sum, up) => sum + up.restarts, 0),
      sessions: server.sessions.size,
    };
  }
  return out;
}

/**
 * Client requests a child is working on whose client still waits. Not counted: calls held for a retry, those
 * whose client left, and those waiting for their client's answer to the child's own request (new requests,
 * that answer included, are refused while shutting down, so they cannot finish).
 */
function requestsInFlight(proxy: Proxy): number {
  let count = 0;
  for (const server of proxy.servers.values()) {
    for (const up of server.upstreams) {
      for (const pending of up.pending.values()) {
        const session = pending.session;
        if (!session || session.closed || pending.exchange?.done || session.serverRequests?.size) continue;
        if (session.call ? session.call.exchange : true) count++;
      }
      for (const entry of up.laneQueue) if (!entry.gone()) count++;
    }
  }
  return count;
}

/**
 * RUNNING → CLOSING → CLOSED (ws). Stop accepting, end every stream and session, stop every child group in
 * steps, and finish within shutdownTimeoutMs whatever the children do.
 */
function closeProxy(proxy: Proxy, drain: boolean): Promise<void> {
  if (proxy.closed) return proxy.closed;
  proxy.state = 'CLOSING';
  proxy.closed = (async () => {
    const httpClosed = new Promise<void>((resolve) => proxy.http.close(() => resolve()));
    // New requests get 503 from here on; those in flight may finish (the sweep and keep-alives run meanwhile).
    const inFlight = drain ? requestsInFlight(proxy) : 0;
    if (inFlight > 0) {
      proxy.log.info('proxy', `waiting up to ${proxy.limits.drainGraceMs} ms for ${inFlight} requests in flight`);
      await waitUntil(() => requestsInFlight(proxy) === 0, proxy.limits.drainGraceMs);
    }
    for (const timer of proxy.timers) clearInterval(timer);
    proxy.watcher?.close();
    proxy.stopTlsWatch?.();
    const segments = [...proxy.servers.keys()];
    const stopped = Promise.all(segments.map((segment) => removeServer(proxy, segment, 'shutdown')));
    for (const stream of [...proxy.streams]) closeStream(stream);
    proxy.startQueue = [];
    // Children stop in steps, and groups of children that crashed earlier may still be emptying.
    const emptied = stopped.then(() => Promise.all([...proxy.groups.values()]));
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([emptied, new Promise((resolve) => (timer = setTimeout(resolve, proxy.limits.shutdownTimeoutMs)))]);
    clearTimeout(timer);
    for (const pgid of proxy.groups.keys()) signalPgid(pgid, 'SIGKILL'); // past the deadline: no stray survives us
    proxy.http.closeAllConnections();
    await httpClosed;
    LIVE_PROXIES.delete(proxy);
    if (proxy.auditFd !== null) closeSync(proxy.auditFd); // last: the sessions ended above were audited
    proxy.auditFd = null;
    proxy.state = 'CLOSED';
  })();
  return proxy.closed;
}

// ── 13. Doctor: replay Claude.ai's connect ──────────────────────────────────────────────────────────────
//
// `doctor [URL]` does against a running proxy what Claude.ai does when a user adds a connector, step by
// step, and says in plain words which step fails and why: the unauthenticated POST and its 401 challenge,
// both metadata documents and their exact-match rules, a registration as Claude.ai sends it, the operator's
// consent (a browser opens the printed URL; the answer comes back to a loopback listener here, RFC 8252), the
// token, and then initialize and tools/list with it. The grant it made is revoked at the end.

type DoctorOptions = {
  /** Each HTTP step; Claude.ai allows 10 s for discovery, registration and token requests. */
  stepTimeoutMs: number;
  /** How long to wait for the operator to approve in the browser. */
  consentTimeoutMs: number;
  out: (line: string) => void;
};

type HttpAnswer = { status: number; headers: http.IncomingHttpHeaders; text: string };

const DOCTOR_STEP_TIMEOUT_MS = 10_000;
const DOCTOR_CONSENT_TIMEOUT_MS = 5 * 60_000;
const DOCTOR_MAX_BODY_BYTES = MIB;
/** What Claude.ai sends (github.com/anthropics/claude-ai-mcp/issues/76, /473): Accept "*∕*", no version header. */
const CLAUDE_INITIALIZE = JSON.stringify({
  jsonrpc: '2.0', id: 0, method: 'initialize',
  params: { protocolVersion: '2025-11-25', capabilities: {}, clientInfo: { name: 'remote-mcp-proxy doctor', version: PROXY_VERSION } },
});

/** Runs every step against one endpoint URL; true when all passed. */
export async function doctor(target: string, options: DoctorOptions): Promise<boolean> {
  // Everything printed may come from the server being checked: control characters are escaped.
  const out = (line: string) => options.out(escapeControl(line));
  const pass = (step: string, detail: string) => out(`PASS  ${step}: ${detail}`);
  const fail = (step: string, why: string) => (out(`FAIL  ${step}: ${why}`), false);
  let url: URL;
  try {
    url = new URL(target);
  } catch {
    return fail('URL', `${JSON.stringify(target)} is not a URL`);
  }
  if (url.protocol !== 'https:' || (url.port !== '' && url.port !== '443')) {
    out(`WARN  URL: Claude.ai connects only to https:// on port 443; ${url.origin} will work for other clients only`);
  }
  const ask = (method: string, where: string, body?: string, headers: Record<string, string> = {}) =>
    doctorRequest(method, where, body, headers, options.stepTimeoutMs);

  // 1. The unauthenticated POST, as Claude.ai sends it.
  const first = await ask('POST', url.href, CLAUDE_INITIALIZE, { 'Content-Type': 'application/json', Accept: '*/*' }).catch(networkError);
  if (typeof first === 'string') return fail('unauthenticated POST', first);
  if (first.status === 200) return fail('unauthenticated POST', 'the endpoint answered without any login: anyone who finds the URL can use this server (set MCP_PROXY_PASSWORD and --public-url)');
  if (first.status !== 401) return fail('unauthenticated POST', `expected 401, got ${first.status}${first.status === 404 ? ' (no MCP endpoint at this URL: check the server name and path)' : ''}`);
  const challenge = String(first.headers['www-authenticate'] ?? '');
  const metadataAt = /resource_metadata="([^"]+)"/.exec(challenge)?.[1];
  if (!metadataAt) {
    const as = await ask('GET', `${url.origin}/.well-known/oauth-authorization-server`).catch(networkError);
    const why = typeof as !== 'string' && as.status === 200
      ? 'OAuth is on, but this path is no MCP endpoint of the proxy (check the server name: /NAME/mcp)'
      : 'OAuth is off (set MCP_PROXY_PASSWORD and --public-url)';
    return fail('401 challenge', `WWW-Authenticate is ${JSON.stringify(challenge)}, with no resource_metadata: Claude.ai cannot find how to log in; ${why}`);
  }
  if (!/^https?:\/\//.test(metadataAt)) return fail('401 challenge', `resource_metadata ${JSON.stringify(metadataAt)} is not an absolute URL`);
  if (/error=/.test(challenge)) return fail('401 challenge', 'carries an error although no token was sent (RFC 6750 §3.1)');
  pass('unauthenticated POST', `401 with resource_metadata ${metadataAt}`);

  // 2. Protected resource metadata: `resource` must be exactly the URL the user pastes.
  const prm = await askJson(ask, metadataAt);
  if (typeof prm === 'string') return fail('protected resource metadata', prm);
  if (prm.resource !== url.href.replace(/\/$/, '') && prm.resource !== url.href) {
    return fail('protected resource metadata', `resource is ${JSON.stringify(prm.resource)} but you connect to ${url.href}: Claude.ai requires them equal (is --public-url the URL clients use?)`);
  }
  const issuer = Array.isArray(prm.authorization_servers) ? prm.authorization_servers[0] : undefined;
  const issuerUrl = typeof issuer === 'string' ? parseUrl(issuer) : null;
  if (!issuerUrl) return fail('protected resource metadata', 'authorization_servers names no issuer URL');
  if (issuerUrl.pathname !== '/' && issuerUrl.pathname !== '') return fail('protected resource metadata', `the issuer ${issuer} has a path: Claude.ai looks for metadata only at the origin root`);
  // The passphrase is typed into the issuer's page: it must be this proxy's own origin (or, for a host route
  // {name}.{domain}, the public origin {domain}), never a site the checked server merely names.
  if (!sameSite(issuerUrl, url)) return fail('protected resource metadata', `the issuer ${issuerUrl.origin} is another site than ${url.origin}: not this proxy's login`);
  pass('protected resource metadata', `resource matches; issuer ${issuer}`);

  // 3. Authorization server metadata at the root (RFC 8414 §3).
  const as = await askJson(ask, `${issuerUrl.origin}/.well-known/oauth-authorization-server`);
  if (typeof as === 'string') return fail('authorization server metadata', as);
  const offSite = ['authorization_endpoint', 'token_endpoint', 'registration_endpoint', 'revocation_endpoint']
    .filter((field) => as[field] !== undefined && parseUrl(String(as[field]))?.origin !== issuerUrl.origin);
  const problems = [
    as.issuer !== String(issuer).replace(/\/$/, '') && as.issuer !== issuer ? `issuer is ${JSON.stringify(as.issuer)}, not ${issuer}` : '',
    offSite.length ? `${offSite.join(', ')} not on the issuer's origin ${issuerUrl.origin}` : '',
    !(Array.isArray(as.code_challenge_methods_supported) && as.code_challenge_methods_supported.includes('S256')) ? 'S256 PKCE is not advertised' : '',
    typeof as.registration_endpoint !== 'string' ? 'no registration_endpoint (Claude.ai registers dynamically)' : '',
    !(Array.isArray(as.token_endpoint_auth_methods_supported) && as.token_endpoint_auth_methods_supported.includes('client_secret_post')) ? 'client_secret_post is not accepted' : '',
  ].filter(Boolean);
  if (problems.length) return fail('authorization server metadata', problems.join('; '));
  pass('authorization server metadata', 'issuer, PKCE S256, registration and client_secret_post as Claude.ai needs');

  // 4–6. Register as Claude.ai does, get the operator's consent, trade the code for a token.
  const grant = await authorizeInteractively(ask, as, url.href, options);
  if (typeof grant === 'string') return fail('login', grant);
  pass('login', 'registered, approved by the operator, token issued');

  // 7. The connect itself, with the token.
  const auth = { Authorization: `Bearer ${grant.accessToken}`, 'Content-Type': 'application/json', Accept: '*/*' };
  const init = await ask('POST', url.href, CLAUDE_INITIALIZE, auth).catch(networkError);
  if (typeof init === 'string' || init.status !== 200) return fail('initialize with the token', typeof init === 'string' ? init : `got ${init.status}`);
  const session = String(init.headers['mcp-session-id'] ?? '');
  const withSession = { ...auth, ...(session ? { 'Mcp-Session-Id': session } : {}) };
  await ask('POST', url.href, '{"jsonrpc":"2.0","method":"notifications/initialized"}', withSession).catch(networkError);
  const list = await ask('POST', url.href, '{"jsonrpc":"2.0","id":1,"method":"tools/list"}', withSession).catch(networkError);
  const tools = typeof list === 'string' ? null : toolCount(list);
  if (tools === null) return fail('tools/list', typeof list === 'string' ? list : `got ${list.status}`);
  pass('initialize and tools/list', `${tools} tools`);
  if (session) await ask('DELETE', url.href, undefined, withSession).catch(networkError);
  await ask('POST', String(as.revocation_endpoint ?? `${issuerUrl.origin}/revoke`), new URLSearchParams({
    token: grant.refreshToken, client_id: grant.clientId, client_secret: grant.clientSecret,
  }).toString(), { 'Content-Type': 'application/x-www-form-urlencoded' }).catch(networkError);
  out(`OK    paste this URL into Claude.ai (Settings → Connectors → Add custom connector): ${url.href}`);
  return true;
}

type DoctorGrant = { accessToken: string; refreshToken: string; clientId: string; clientSecret: string };

function parseUrl(text: string): URL | null {
  try {
    const url = new URL(text);
    return url.protocol === 'https:' || url.protocol === 'http:' ? url : null;
  } catch {
    return null;
  }
}

/** The same origin, or the target one label below the issuer's host ({name}.{domain}: host routes), same scheme. */
function sameSite(issuer: URL, target: URL): boolean {
  if (issuer.origin === target.origin) return true;
  const suffix = `.${issuer.hostname}`;
  return issuer.protocol === target.protocol && issuer.hostname.includes('.') && target.hostname.endsWith(suffix) &&
    !target.hostname.slice(0, -suffix.length).includes('.');
}

async function authorizeInteractively(
  ask: (method: string, where: string, body?: string, headers?: Record<string, string>) => Promise<HttpAnswer>,
  as: Record<string, unknown>, resource: string, options: DoctorOptions,
): Promise<DoctorGrant | string> {
  const callback = await listenForCallback(options.consentTimeoutMs);
  try {
    const registered = await ask('POST', String(as.registration_endpoint), JSON.stringify({
      client_name: 'remote-mcp-proxy doctor', redirect_uris: [callback.uri], token_endpoint_auth_method: 'client_secret_post',
      grant_types: ['authorization_code', 'refresh_token'], response_types: ['code'],
    }), { 'Content-Type': 'application/json', Accept: 'application/json' }).catch(networkError);
    if (typeof registered === 'string') return `registration: ${registered}`;
    const client = parseJsonObject(registered.text);
    if (registered.status !== 201 || typeof client?.client_id !== 'string' || typeof client.client_secret !== 'string') {
      return `registration answered ${registered.status}: ${headOf(registered.text)}`;
    }
    const verifier = randomBytes(32).toString('base64url');
    const state = randomBytes(16).toString('base64url');
    const authorize = new URL(String(as.authorization_endpoint));
    for (const [key, value] of Object.entries({
      response_type: 'code', client_id: client.client_id, redirect_uri: callback.uri, state, resource,
      code_challenge: createHash('sha256').update(verifier).digest('base64url'), code_challenge_method: 'S256',
    })) authorize.searchParams.set(key, value);
    options.out(`ACT   open this URL in a browser on this machine and approve with the proxy's passphrase:\n      ${authorize.href}`);
    const answer = await callback.result;
    if (typeof answer === 'string') return answer;
    if (answer.get('state') !== state) return 'the consent page did not return our state unchanged';
    const code = answer.get('code');
    if (!code) return `the consent page answered ${answer.get('error') ?? 'without a code'}${answer.get('error_description') ? `: ${answer.get('error_description')}` : ''}`;
    const token = await ask('POST', String(as.token_endpoint), new URLSearchParams({
      grant_type: 'authorization_code', code, code_verifier: verifier, redirect_uri: callback.uri, resource,
      client_id: client.client_id, client_secret: client.client_secret,
    }).toString(), { 'Content-Type': 'application/x-www-form-urlencoded', Accept: 'application/json' }).catch(networkError);
    if (typeof token === 'string') return `token: ${token}`;
    const tokens = parseJsonObject(token.text);
    if (token.status !== 200 || typeof tokens?.access_token !== 'string') return `the token endpoint answered ${token.status}: ${headOf(token.text)}`;
    return { accessToken: tokens.access_token, refreshToken: String(tokens.refresh_token ?? ''), clientId: client.client_id, clientSecret: client.client_secret };
  } finally {
    callback.close();
  }
}

/** A loopback listener for the authorization response: its redirect URI, and the query it receives (or why not). */
async function listenForCallback(timeoutMs: number): Promise<{ uri: string; result: Promise<URLSearchParams | string>; close(): void }> {
  let settle: (value: URLSearchParams | string) => void = () => undefined;
  const result = new Promise<URLSearchParams | string>((resolve) => (settle = resolve));
  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    if (url.pathname !== '/callback') return void res.writeHead(404).end();
    res.writeHead(200, { 'Content-Type': 'text/plain; charset=utf-8' }).end('remote-mcp-proxy doctor: done, you can close this tab.');
    settle(url.searchParams);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const timer = setTimeout(() => settle(`nobody approved within ${Math.round(timeoutMs / 1000)} s`), timeoutMs);
  const port = (server.address() as { port: number }).port;
  return {
    uri: `http://127.0.0.1:${port}/callback`,
    result,
    close: () => {
      clearTimeout(timer);
      server.close();
      server.closeAllConnections();
    },
  };
}

async function askJson(ask: (method: string, where: string) => Promise<HttpAnswer>, where: string): Promise<Record<string, unknown> | string> {
  const answer = await ask('GET', where).catch(networkError);
  if (typeof answer === 'string') return `${where}: ${answer}`;
  if (answer.status !== 200) return `${where} answered ${answer.status}`;
  return parseJsonObject(answer.text) ?? `${where} is not a JSON object`;
}

function parseJsonObject(text: string): Record<string, any> | null {
  try {
    const value = JSON.parse(text);
    return isObject(value) ? value : null;
  } catch {
    return null;
  }
}

/** tools/list answered as JSON or as one SSE event. */
function toolCount(answer: HttpAnswer): number | null {
  if (answer.status !== 200) return null;
  const data = String(answer.headers['content-type']).startsWith('text/event-stream')
    ? answer.text.split('\n').filter((line) => line.startsWith('data:')).map((line) => line.slice(5).trim()).join('')
    : answer.text;
  const tools = parseJsonObject(data)?.result?.tools;
  return Array.isArray(tools) ? tools.length : null;
}

function networkError(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ECONNREFUSED') return 'connection refused (is the proxy running, and is this its address?)';
  if (code === 'ENOTFOUND') return 'the host name does not resolve';
  if (code === 'TIMEOUT') return 'no answer in time (Claude.ai gives up after 10 s)';
  return `network error (${code ?? describeError(err)})`;
}

/** One request with a deadline and a bounded answer; http or https by the URL. */
function doctorRequest(method: string, where: string, body: string | undefined, headers: Record<string, string>, timeoutMs: number): Promise<HttpAnswer> {
  return new Promise((resolve, rejectAnswer) => {
    const url = new URL(where);
    const request = (url.protocol === 'https:' ? https.request : http.request)(url, { method, headers, timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (chunk: Buffer) => {
        size += chunk.length;
        if (size <= DOCTOR_MAX_BODY_BYTES) chunks.push(chunk);
        // An SSE answer stays open: the first complete event is all a step needs.
        if (String(res.headers['content-type']).startsWith('text/event-stream') && Buffer.concat(chunks).includes('\n\n')) res.destroy();
      });
      const done = () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') });
      res.on('end', done);
      res.on('close', done);
    });
    // `timeout` is idle time only: a server trickling its answer gets a deadline for the whole step.
    const deadline = setTimeout(() => request.destroy(Object.assign(new Error('timeout'), { code: 'TIMEOUT' })), timeoutMs);
    request.on('close', () => clearTimeout(deadline));
    request.on('timeout', () => request.destroy(Object.assign(new Error('timeout'), { code: 'TIMEOUT' })));
    request.on('error', rejectAnswer);
    request.end(body);
  });
}

/** The endpoints doctor checks without a URL: every server's /mcp on the public URL (or the local address). */
function doctorTargets(config: Config, options: Options): string[] {
  const base = options.publicUrl ? new URL(options.publicUrl).origin : `${options.tlsCert ? 'https' : 'http'}://${options.host.includes(':') ? `[${options.host}]` : options.host}:${options.port}`;
  return config.servers.map((server) => `${base}/${serverSegment(server.name)}/mcp`);
}

async function doctorCommand(target: string | undefined, options: Options): Promise<void> {
  const out = (line: string) => process.stdout.write(`${line}\n`);
  let targets = target ? [target] : [];
  if (!target) {
    const loaded = loadConfigFile(options.configPath);
    if (!loaded.config) {
      for (const error of loaded.errors) writeStderr(`error: ${error}`);
      process.exit(1);
    }
    targets = doctorTargets(loaded.config, options);
  }
  let ok = true;
  for (const each of targets) {
    out(`── ${each}`);
    ok = (await doctor(each, { stepTimeoutMs: DOCTOR_STEP_TIMEOUT_MS, consentTimeoutMs: DOCTOR_CONSENT_TIMEOUT_MS, out })) && ok;
  }
  process.exit(ok ? 0 : 1);
}

// ── 14. CLI and main ────────────────────────────────────────────────────────────────────────────────────

const USAGE = `Usage: node dist/proxy.js [check | healthcheck | hash-password | doctor [URL]] [options]

Serves every stdio MCP server of a claude_desktop_config.json-style file at
  http://HOST:PORT/NAME/mcp   (Streamable HTTP)
  http://HOST:PORT/NAME/sse   (legacy HTTP+SSE)

Commands:
  (none)                     run the proxy
  check                      validate the config and exit (non-zero with the errors)
  healthcheck                GET /healthz on the running proxy; exit 0 if it answers 200
  hash-password              read a passphrase on stdin, print its scrypt hash for MCP_PROXY_PASSWORD
  doctor [URL]               replay Claude.ai's connect against URL (default: every server on --public-url)

Options (each also as an environment variable):
  --config PATH              config file                 MCP_PROXY_CONFIG     (default ./config.json)
  --host ADDR                address to bind             MCP_PROXY_HOST       (default 127.0.0.1)
  --port N                   port to bind                MCP_PROXY_PORT       (default 8080)
  --token TOKEN              bearer token, repeatable    MCP_PROXY_TOKEN      (comma-separated)
  --token-file PATH          file of tokens, one a line  MCP_PROXY_TOKEN_FILE
  --allow-unauthenticated    serve a non-loopback address without auth    MCP_PROXY_ALLOW_UNAUTHENTICATED=1
  --allow-origin ORIGIN      extra allowed Origin, repeatable             MCP_PROXY_ALLOW_ORIGINS (comma-separated)
  --cors-origin ORIGIN       send CORS headers to ORIGIN, repeatable      MCP_PROXY_CORS_ORIGINS (comma-separated)
  --log-level LEVEL          error | warn | info | debug  MCP_PROXY_LOG_LEVEL  (default info)
  --log-format FORMAT        text | json (one JSON object a line)  MCP_PROXY_LOG_FORMAT  (default text)
  --packages-dir DIR         run \`npx [-y] PKG\` from DIR/node_modules/PKG   MCP_PROXY_PACKAGES_DIR
  --strict-protocol-header   refuse a 2026-07-28 request sent with MCP-Protocol-Version 2025-11-25
                             (Claude's connector sends that pair)   MCP_PROXY_STRICT_PROTOCOL_HEADER=1
  --no-watch                 do not reload when the config or a \${file:} secret changes (SIGHUP still
                             reloads)                                     MCP_PROXY_WATCH=0
  --audit-log PATH           append audit events (tool calls, sessions, grants; never arguments) to PATH
                             instead of the log; SIGUSR1 reopens it       MCP_PROXY_AUDIT_LOG
  --start-concurrency N      children starting at once, 1 to ${MAX_START_CONCURRENCY}  MCP_PROXY_START_CONCURRENCY  (default ${DEFAULT_LIMITS.startConcurrency})
  --tls-cert PATH            serve HTTPS with this PEM certificate chain   MCP_PROXY_TLS_CERT
  --tls-key PATH             …and this PEM private key (both or neither;   MCP_PROXY_TLS_KEY
                             both are re-read when their directory changes)

OAuth for Claude.ai (on when a passphrase is set):
  MCP_PROXY_PASSWORD         the passphrase the consent page asks for, or its scrypt hash (hash-password)
  --password-file PATH       the same, from a file                       MCP_PROXY_PASSWORD_FILE
  --public-url URL           the https origin clients use                MCP_PROXY_PUBLIC_URL
  --base-domain DOMAIN       also serve NAME.DOMAIN/mcp for each server  MCP_PROXY_BASE_DOMAIN
  --oauth-client-id ID       a pre-registered client (Claude.ai's Advanced settings); its secret in
                             MCP_PROXY_OAUTH_CLIENT_SECRET               MCP_PROXY_OAUTH_CLIENT_ID
  --client-metadata-host H   accept client ID metadata documents from H (e.g. claude.ai), repeatable;
                             off by default: it makes the proxy fetch URLs  MCP_PROXY_CLIENT_METADATA_HOSTS
  --trust-proxy ADDR         believe X-Forwarded-For from this reverse proxy (address or CIDR), for
                             per-client rate limits; repeatable           MCP_PROXY_TRUST_PROXY
  --state-dir DIR            where clients and grants persist            MCP_PROXY_STATE_DIR
                             (default $XDG_STATE_HOME/remote-mcp-proxy or ~/.local/state/remote-mcp-proxy)
  -h, --help                 show this help
`;

type Command = 'serve' | 'check' | 'help' | 'healthcheck' | 'hash-password' | 'doctor';
type CliResult = { command: Command; options: Options; target?: string } | { error: string };

const VALUE_FLAGS: ReadonlySet<string> = new Set([
  '--config', '--host', '--port', '--token', '--token-file', '--allow-origin', '--cors-origin', '--log-level', '--log-format',
  '--packages-dir', '--audit-log', '--public-url', '--base-domain', '--state-dir', '--password-file', '--oauth-client-id', '--client-metadata-host', '--trust-proxy',
  '--tls-cert', '--tls-key', '--start-concurrency',
]);

/** Flags win over MCP_PROXY_* variables, which win over the defaults. Pure but for reading a token file. */
export function parseCli(argv: readonly string[], env: Env, readFile: ReadFile = readUtf8): CliResult {
  const flags = new Map<string, string[]>();
  let command: Command = 'serve';
  let target: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') return { command: 'help', options: defaultOptions() };
    if (i === 0 && (arg === 'check' || arg === 'healthcheck' || arg === 'hash-password' || arg === 'doctor')) {
      command = arg;
      continue;
    }
    if (i === 1 && command === 'doctor' && !arg.startsWith('-')) {
      target = arg;
      continue;
    }
    const eq = arg.indexOf('=');
    const name = arg.startsWith('--') && eq !== -1 ? arg.slice(0, eq) : arg;
    if (name === '--allow-unauthenticated' || name === '--strict-protocol-header' || name === '--no-watch') {
      flags.set(name, ['true']);
      continue;
    }
    if (!VALUE_FLAGS.has(name)) return { error: `unknown argument ${JSON.stringify(arg)}` };
    const value = eq !== -1 && name !== arg ? arg.slice(eq + 1) : argv[++i];
    if (value === undefined) return { error: `${name} needs a value` };
    flags.set(name, [...(flags.get(name) ?? []), value]);
  }
  const built = buildOptions(command, flags, env, readFile);
  return 'error' in built || target === undefined ? built : { ...built, target };
}

function buildOptions(command: Exclude<Command, 'help'>, flags: Map<string, string[]>, env: Env, readFile: ReadFile): CliResult {
  const one = (flag: string, variable: string) => flags.get(flag)?.at(-1) ?? (env[variable] || undefined);
  const list = (flag: string, variable: string) => flags.get(flag) ?? splitList(env[variable]);
  const portText = one('--port', 'MCP_PROXY_PORT') ?? String(DEFAULT_PORT);
  const port = /^\d+$/.test(portText) ? Number(portText) : NaN;
  if (!(port >= 0 && port <= 65535)) return { error: `--port: got ${JSON.stringify(portText)}, expected a number from 0 to 65535` };
  const logLevel = (one('--log-level', 'MCP_PROXY_LOG_LEVEL') ?? 'info') as LogLevel;
  if (!LOG_LEVELS.includes(logLevel)) return { error: `--log-level: got ${JSON.stringify(logLevel)}, expected one of ${LOG_LEVELS.join(', ')}` };
  const logFormat = (one('--log-format', 'MCP_PROXY_LOG_FORMAT') ?? 'text') as LogFormat;
  if (!LOG_FORMATS.includes(logFormat)) return { error: `--log-format: got ${JSON.stringify(logFormat)}, expected one of ${LOG_FORMATS.join(', ')}` };
  const tokens = [...list('--token', 'MCP_PROXY_TOKEN')];
  const tokenFile = one('--token-file', 'MCP_PROXY_TOKEN_FILE');
  if (tokenFile !== undefined) {
    try {
      tokens.push(...readTokenFile(readFile(tokenFile, MAX_SECRET_FILE_BYTES)));
    } catch (err) {
      return { error: `--token-file: cannot read ${JSON.stringify(tokenFile)} (${readFailure(err)})` };
    }
  }
  const weak = tokenProblem(tokens);
  if (weak) return { error: `--token: ${weak}` };
  const tlsCert = one('--tls-cert', 'MCP_PROXY_TLS_CERT');
  const tlsKey = one('--tls-key', 'MCP_PROXY_TLS_KEY');
  if ((tlsCert === undefined) !== (tlsKey === undefined)) {
    return { error: `${tlsCert === undefined ? '--tls-key' : '--tls-cert'} needs ${tlsCert === undefined ? '--tls-cert' : '--tls-key'} too (MCP_PROXY_TLS_CERT and MCP_PROXY_TLS_KEY): HTTPS needs both the certificate and its key` };
  }
  const concurrencyText = one('--start-concurrency', 'MCP_PROXY_START_CONCURRENCY');
  const startConcurrency = concurrencyText === undefined ? undefined : /^\d+$/.test(concurrencyText) ? Number(concurrencyText) : NaN;
  if (startConcurrency !== undefined && !(startConcurrency >= 1 && startConcurrency <= MAX_START_CONCURRENCY)) {
    return { error: `--start-concurrency: got ${JSON.stringify(concurrencyText)}, expected an integer from 1 to ${MAX_START_CONCURRENCY}` };
  }
  const allowRaw = flags.has('--allow-unauthenticated') ? 'true' : (env.MCP_PROXY_ALLOW_UNAUTHENTICATED ?? '');
  const strictRaw = flags.has('--strict-protocol-header') ? 'true' : (env.MCP_PROXY_STRICT_PROTOCOL_HEADER ?? '');
  const watchRaw = flags.has('--no-watch') ? 'false' : (env.MCP_PROXY_WATCH ?? 'true');
  const auditLog = one('--audit-log', 'MCP_PROXY_AUDIT_LOG');
  const options: Options = {
    configPath: one('--config', 'MCP_PROXY_CONFIG') ?? DEFAULT_CONFIG_PATH,
    host: one('--host', 'MCP_PROXY_HOST') ?? DEFAULT_HOST,
    port,
    tokens,
    allowUnauthenticated: allowRaw === '1' || allowRaw.toLowerCase() === 'true',
    allowedOrigins: list('--allow-origin', 'MCP_PROXY_ALLOW_ORIGINS').map(normalizeOrigin),
    corsOrigins: list('--cors-origin', 'MCP_PROXY_CORS_ORIGINS').map(normalizeOrigin),
    logLevel,
    logFormat,
    packagesDir: one('--packages-dir', 'MCP_PROXY_PACKAGES_DIR'),
    publicUrl: one('--public-url', 'MCP_PROXY_PUBLIC_URL'),
    baseDomain: one('--base-domain', 'MCP_PROXY_BASE_DOMAIN')?.toLowerCase(),
    passphrase: undefined,
    stateDir: one('--state-dir', 'MCP_PROXY_STATE_DIR') ?? defaultStateDir(env),
    oauthClient: undefined,
    clientMetadataHosts: list('--client-metadata-host', 'MCP_PROXY_CLIENT_METADATA_HOSTS').map((host) => host.toLowerCase()),
    trustProxy: list('--trust-proxy', 'MCP_PROXY_TRUST_PROXY'),
    strictProtocolHeader: strictRaw === '1' || strictRaw.toLowerCase() === 'true',
    watchConfig: !(watchRaw === '0' || watchRaw.toLowerCase() === 'false'),
    auditLog,
    tlsCert,
    tlsKey,
    startConcurrency,
  };
  const clientId = one('--oauth-client-id', 'MCP_PROXY_OAUTH_CLIENT_ID');
  if (clientId !== undefined) {
    const secret = env.MCP_PROXY_OAUTH_CLIENT_SECRET;
    if (!secret) return { error: '--oauth-client-id: set its secret in MCP_PROXY_OAUTH_CLIENT_SECRET' };
    options.oauthClient = { id: clientId, secret };
  }
  // The passphrase from the environment or a file only: a flag would show it in `ps`.
  const passphraseFile = one('--password-file', 'MCP_PROXY_PASSWORD_FILE');
  if (passphraseFile !== undefined) {
    try {
      options.passphrase = readFile(passphraseFile, MAX_SECRET_FILE_BYTES).replace(/\r?\n$/, '');
    } catch (err) {
      return { error: `--password-file: cannot read ${JSON.stringify(passphraseFile)} (${readFailure(err)})` };
    }
  } else if (env.MCP_PROXY_PASSWORD) options.passphrase = env.MCP_PROXY_PASSWORD;
  return { command, options };
}

function splitList(value: string | undefined): string[] {
  return value ? value.split(',').map((item) => item.trim()).filter(Boolean) : [];
}

/** One token a line; blank lines and # comments ignored (a Kubernetes Secret mounted as a file). */
function readTokenFile(text: string): string[] {
  return text.split(/\r?\n/).map((line) => line.trim()).filter((line) => line && !line.startsWith('#'));
}

async function main(): Promise<void> {
  const cli = parseCli(process.argv.slice(2), process.env);
  if ('error' in cli) {
    writeStderr(`${PROXY_NAME}: ${cli.error}\nRun with --help for usage.`);
    process.exit(2);
  }
  if (cli.command === 'help') return void process.stdout.write(USAGE);
  if (cli.command === 'healthcheck') return healthcheck(cli.options);
  if (cli.command === 'hash-password') return hashPasswordCommand();
  if (cli.command === 'doctor') return doctorCommand(cli.target, cli.options);
  const log = createLogger(cli.options.logLevel, writeStderr, cli.options.logFormat);
  const loaded = loadConfigFile(cli.options.configPath);
  for (const warning of loaded.warnings) log.warn('config', warning);
  if (!loaded.config) {
    // `check` and text logs print plain lines for a person; JSON logs keep one object a line for the collector.
    const json = cli.command === 'serve' && cli.options.logFormat === 'json';
    for (const error of loaded.errors) json ? log.error('config', error) : writeStderr(`error: ${error}`);
    process.exit(1);
  }
  if (cli.command === 'check') {
    const host = checkHost(loaded.config, cli.options.configPath, { env: process.env, packagesDir: cli.options.packagesDir });
    for (const warning of [...(loaded.defaulted ?? []), ...host.warnings]) writeStderr(`warning: ${warning}`);
    if (cli.options.tlsCert !== undefined) {
      try {
        readTlsPair(cli.options.tlsCert, cli.options.tlsKey);
      } catch (err) {
        host.errors.push((err as Error).message);
      }
    }
    for (const problem of host.errors) writeStderr(`error: ${problem}`);
    if (host.errors.length) process.exit(1);
    const names = loaded.config.servers.map((server) => server.name).join(', ') || 'none';
    return void process.stdout.write(`config OK: ${cli.options.configPath}: ${loaded.config.servers.length} servers (${names})\n`);
  }
  installCrashGuard(log);
  await serve(loaded.config, cli.options, log);
}

/** What `check` finds beyond the file: errors stop a start; warnings may fail at run time (or be meant). */
export type HostCheck = { errors: string[]; warnings: string[] };

/**
 * What `check` can see beyond the file itself. An error: a working directory that does not exist or is not
 * one. Warnings, since the config may be meant for another machine or image: a command not found where the
 * child's spawn would look, an `npx` package not baked into --packages-dir, and a per-session server whose
 * sessions each hold a process for the PER_SESSION_IDLE_MS default. `runtime.env` is the proxy's environment.
 */
export function checkHost(config: Config, source: string, runtime: { env: Env; packagesDir: string | undefined }): HostCheck {
  const errors: string[] = [];
  const warnings: string[] = [];
  for (const server of config.servers) {
    const at = `${source}: mcpServers.${server.name}`;
    const cwdProblem = server.cwd === undefined ? null : directoryProblem(server.cwd);
    if (cwdProblem) errors.push(`${at}.cwd: ${JSON.stringify(server.cwd)} is ${cwdProblem}`);
    const launch = launchWarning(server, runtime);
    if (launch) warnings.push(`${at}.command: ${launch}`);
    const idleMs = server.idleTimeoutMs ?? PER_SESSION_IDLE_MS;
    if (server.sessions === 'per-session' && idleMs >= PER_SESSION_IDLE_MS) {
      warnings.push(`${at}: "sessions": "per-session" keeps a process for each client session until it has been idle ${idleMs} ms ` +
        `(clients rarely end their sessions); set a shorter "idleTimeoutMs", e.g. ${SUGGESTED_PER_SESSION_IDLE_MS}`);
    }
  }
  return { errors, warnings };
}

function directoryProblem(path: string): string | null {
  try {
    return statSync(path).isDirectory() ? null : 'not a directory';
  } catch (err) {
    return `a path that cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`;
  }
}

/** Why the server's command may not start here, naming the fix; null when it resolves to an executable. */
function launchWarning(server: ServerConfig, runtime: { env: Env; packagesDir: string | undefined }): string | null {
  // No PATH at all: execvp (libuv) searches its default, /usr/bin:/bin; an empty one means the working directory.
  const path = childEnv(server, runtime.env).PATH ?? DEFAULT_EXEC_PATH;
  const npx = npxPackage(server);
  if (npx && runtime.packagesDir) {
    if (resolveBakedPackage(server, runtime.packagesDir)) return null; // runs with this node, not npx
    const how = findExecutable(server.command, path, server.cwd).found ? 'npx downloads it at every start (that needs the network)' : 'npx is not on the PATH the server gets';
    return `\`npx ${npx.name}\` is not baked into ${runtime.packagesDir}, and ${how}; the distroless image has neither npx nor network: ` +
      `bake it into the image (docker build --build-arg MCP_NPM_PACKAGES="${npx.name}" …), or install it under ${runtime.packagesDir}/node_modules`;
  }
  const found = findExecutable(server.command, path, server.cwd);
  if (found.found) return interpreterWarning(server.command, found.found, path, server.cwd);
  if (found.notExecutable) return `${JSON.stringify(server.command)} resolves to ${found.notExecutable}, which is not an executable file: chmod +x it, or name the interpreter`;
  return server.command.includes('/')
    ? `${JSON.stringify(server.command)} does not exist: give the path of an installed program`
    : `${JSON.stringify(server.command)} is not found on the PATH the server gets (the proxy's PATH, or its "env".PATH): install it, or give its absolute path`;
}

/**
 * Where spawn would find `command`, as execvp(3) does: a name with a '/' is taken as it is (relative to the
 * child's cwd), a bare name is looked for in each PATH entry (empty: the cwd), and only a regular file with
 * the execute bit counts. The PATH is the child's own (https://nodejs.org/api/child_process.html#child_processspawncommand-args-options).
 */
function findExecutable(command: string, path: string, cwd: string | undefined): { found: string | null; notExecutable?: string } {
  const base = cwd ?? process.cwd();
  const candidates = command.includes('/') ? [resolvePath(base, command)] : path.split(delimiter).map((dir) => resolvePath(base, dir, command));
  let notExecutable: string | undefined;
  for (const file of candidates) {
    try {
      if (!statSync(file).isFile()) continue;
    } catch {
      continue; // not there: execvp tries the next entry
    }
    try {
      accessSync(file, fsConstants.X_OK);
      return { found: file };
    } catch {
      notExecutable ??= file; // execvp goes on too, and reports EACCES only if nothing later runs
    }
  }
  return { found: null, notExecutable };
}

/**
 * A script runs only if its #! interpreter does (spawn then fails with ENOENT, naming the script): the
 * interpreter must exist, and with `#!/usr/bin/env NAME` (npm's bins) NAME must be on the server's PATH. The
 * distroless image has no /usr/bin/env.
 */
function interpreterWarning(command: string, file: string, path: string, cwd: string | undefined): string | null {
  const head = Buffer.alloc(SHEBANG_MAX_BYTES);
  let got = 0;
  try {
    const fd = openSync(file, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
    try {
      got = readSync(fd, head, 0, head.length, 0);
    } finally {
      closeSync(fd);
    }
  } catch {
    return null; // unreadable but executable: the kernel may still run it; nothing to say
  }
  const line = head.toString('latin1', 0, got);
  if (!line.startsWith('#!')) return null;
  const [interpreter, arg] = line.slice(2).split('\n')[0].trim().split(/[ \t]+/);
  if (!interpreter) return null;
  if (!findExecutable(interpreter, '', cwd).found) {
    return `${JSON.stringify(command)} (${file}) is a script for ${interpreter}, which is not here: install it, or run the script with an interpreter that is`;
  }
  if (basename(interpreter) === 'env' && arg && !arg.startsWith('-') && !findExecutable(arg, path, cwd).found) {
    return `${JSON.stringify(command)} (${file}) runs ${JSON.stringify(arg)} through ${interpreter}, and ${JSON.stringify(arg)} is not on the PATH the server gets: install it, or put its directory on that PATH`;
  }
  return null;
}

/**
 * Should the process die anyway (a throw outside every boundary), no child outlives it: every child group is
 * killed on the way out. Children lead their own groups, so nothing else would ever stop them.
 */
export function installCrashGuard(log: Logger): void {
  const die = (what: string) => (err: unknown) => {
    log.error('proxy', `${what}: ${describeError(err)}; killing every child and exiting`);
    killAllChildGroups();
    process.exit(1);
  };
  process.on('uncaughtException', die('uncaught exception'));
  process.on('unhandledRejection', die('unhandled rejection'));
  process.on('exit', killAllChildGroups);
}

async function serve(config: Config, options: Options, log: Logger): Promise<void> {
  // Installed before anything starts: a signal during start-up, with the default action, would end the
  // process and leave the children already spawned running (they lead their own process groups).
  let proxy: RunningProxy | null = null;
  let early: NodeJS.Signals | null = null;
  let stopping = false;
  const stop = (signal: NodeJS.Signals) => {
    if (!proxy) return void (early ??= signal);
    if (stopping) {
      // A second signal: the operator will not wait. Every child group is killed and the process exits now.
      log.warn('proxy', `${signal} again: exiting now`);
      killAllChildGroups();
      return process.exit(1);
    }
    stopping = true;
    log.info('proxy', `${signal}: shutting down (requests in flight get up to ${DEFAULT_LIMITS.drainGraceMs} ms; send it again to exit at once)`);
    proxy.close({ drain: true }).then(() => process.exit(0), () => process.exit(1));
  };
  // Every signal whose default would end the process without stopping the children: SIGQUIT, SIGUSR2.
  // SIGKILL cannot be caught. Kept after the first: a second one must not take the default action (exit
  // without stopping the children). SIGHUP reloads the config, as for nginx and most daemons.
  for (const signal of ['SIGTERM', 'SIGINT', 'SIGQUIT', 'SIGUSR2'] as const) process.on(signal, stop);
  // SIGUSR1 (Node's default: start the inspector) reopens the audit log after logrotate moved it.
  process.on('SIGUSR1', () => proxy?.reopenAuditLog());
  process.on('SIGHUP', () => {
    if (!proxy || stopping) return;
    log.info('config', 'SIGHUP: reloading the config');
    proxy.reload().catch((err) => log.error('config', `reload failed: ${describeError(err)}`));
  });
  let running: RunningProxy;
  try {
    running = await startProxy(config, { ...options, log });
  } catch (err) {
    if (!(err instanceof ProxyError)) throw err;
    if (options.logFormat === 'json') log.error('proxy', err.message);
    else writeStderr(`${PROXY_NAME}: ${err.message}`);
    process.exit(1);
  }
  proxy = running;
  const methods = [
    ...(options.tokens.length ? [`${options.tokens.length} bearer token${options.tokens.length > 1 ? 's' : ''}`] : []),
    ...(options.passphrase ? [`OAuth with consent, issuer ${new URL(options.publicUrl!).origin}`] : []),
  ];
  const auth = methods.length ? `on (${methods.join(', ')})` : 'OFF';
  log.info('proxy', `listening on ${running.url} (${isLoopbackHost(options.host) ? 'loopback only' : 'PUBLIC interface'}), auth ${auth}`);
  for (const server of config.servers) {
    const urls = serverUrls(config.servers.length === 1, options, running.url, serverSegment(server.name)).join('  ');
    log.info('proxy', `${server.name}: ${urls}  (auth ${methods.length ? 'on' : 'off'}${server.sessions === 'per-session' ? ', child per session' : ''})`);
  }
  if (early) stop(early);
}

/**
 * Every URL a user may paste for a server: its path route on the public URL (or the listening address), its
 * host route with a base domain, and the root route when it is the server holding it (rootServer).
 */
export function serverUrls(root: boolean, options: Pick<Options, 'publicUrl' | 'baseDomain'>, listening: string, segment: string): string[] {
  const base = options.publicUrl ? new URL(options.publicUrl).origin : listening;
  const urls = [`${base}/${segment}/mcp`, `${base}/${segment}/sse`];
  if (options.baseDomain && options.publicUrl) {
    const { protocol, port } = new URL(options.publicUrl);
    urls.push(`${protocol}//${segment}.${options.baseDomain}${port ? `:${port}` : ''}/mcp`);
  }
  if (root) urls.push(`${base}/mcp`);
  return urls;
}

/** Reads a passphrase from stdin (one line) and prints the scrypt form for MCP_PROXY_PASSWORD. */
async function hashPasswordCommand(): Promise<void> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  const passphrase = Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, '');
  if (passphrase.length < MIN_PASSPHRASE_CHARS) {
    writeStderr(`${PROXY_NAME}: a passphrase needs at least ${MIN_PASSPHRASE_CHARS} characters`);
    process.exit(2);
  }
  process.stdout.write(`${hashPassphrase(passphrase)}\n`);
}

/** For container HEALTHCHECKs: no shell or curl needed. */
async function healthcheck(options: Options): Promise<void> {
  const host = options.host === '0.0.0.0' || options.host === '::' ? DEFAULT_HOST : options.host;
  const target = { host, port: options.port, path: '/healthz', timeout: DEFAULT_LIMITS.headersTimeoutMs };
  const ok = await new Promise<boolean>((resolve) => {
    const onResponse = (res: http.IncomingMessage) => {
      res.resume();
      resolve(res.statusCode === 200);
    };
    // With TLS the probe does not verify the certificate: it names the public host, not the address probed
    // here, so a correct setup would fail. Nothing is at stake: the probe sends no credential and reads only
    // the status of /healthz from this container's own port.
    const req = options.tlsCert ? https.get({ ...target, rejectUnauthorized: false }, onResponse) : http.get(target, onResponse);
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(false));
  });
  process.exit(ok ? 0 : 1);
}

// Entry guard (Deno file_server style): run main() only when this file is the program, so tests can import it.
function isMainModule(): boolean {
  const entry = process.argv[1];
  if (!entry) return false;
  try {
    return import.meta.url === pathToFileURL(realpathSync(entry)).href;
  } catch {
    return false; // argv[1] is not a file (node -e, the REPL): not our entry point
  }
}

if (isMainModule()) void main();
