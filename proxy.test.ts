// proxy.test.ts — tests for proxy.ts, one `describe` per section of proxy.ts, in file order (STYLE P14).
//
// Real parts only: real node:http listeners on port 0, real child processes (the reference MCP servers from
// devDependencies, plus small `node -e` fixtures for misbehaviour), and the official SDK client transports.
// Every limit is tested under, at and over. Every test that starts a proxy closes it and then checks that
// every process group it saw is gone (bounded poll, never a fixed sleep).
//
// Run: node --import tsx --test --test-concurrency=1 proxy.test.ts   (CLI tests build dist/proxy.js first)

import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import childProcess, { execFile, spawn, type ChildProcess } from 'node:child_process';
import { X509Certificate, createHash, generateKeyPairSync, randomBytes, sign } from 'node:crypto';
import dns from 'node:dns';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { syncBuiltinESMExports } from 'node:module';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import tls from 'node:tls';
import { fileURLToPath, pathToFileURL } from 'node:url';
import v8 from 'node:v8';
import vm from 'node:vm';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { SSEClientTransport } from '@modelcontextprotocol/sdk/client/sse.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { UnauthorizedError, type OAuthClientProvider } from '@modelcontextprotocol/sdk/client/auth.js';
import type { OAuthClientInformationMixed, OAuthClientMetadata, OAuthTokens } from '@modelcontextprotocol/sdk/shared/auth.js';
import {
  CreateMessageRequestSchema,
  ElicitRequestSchema,
  ListRootsRequestSchema,
  ResourceUpdatedNotificationSchema,
  ToolListChangedNotificationSchema,
} from '@modelcontextprotocol/sdk/types.js';
import { Client as V2Client, StreamableHTTPClientTransport as V2StreamableTransport } from '@modelcontextprotocol/client';
import fc from 'fast-check';
import { chromium } from 'playwright-core';
import {
  DEFAULT_LIMITS,
  ProxyError,
  SUPPORTED_PROTOCOL_VERSIONS,
  checkHost,
  createIdScanner,
  createLineFramer,
  diffConfigs,
  doctor,
  fetchClientMetadata,
  jsonDepthExceeds,
  loadConfigFile,
  negotiateVersion,
  nextRestart,
  parseCli,
  parseConfig,
  serverSegment,
  startProxy,
  tokenMatches,
} from './proxy.ts';

// ── Test helpers ────────────────────────────────────────────────────────────────────────────────────────

type RunningProxy = Awaited<ReturnType<typeof startProxy>>;
type Config = Parameters<typeof startProxy>[0];
type StartOptions = Parameters<typeof startProxy>[1];
type Limits = typeof DEFAULT_LIMITS;
type ServerConfig = Config['servers'][number];
// Parsed JSON from the wire; the tests inspect it field by field.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Json = any;

const HERE = path.dirname(fileURLToPath(import.meta.url));
const NODE = process.execPath;
const PKG = path.join(HERE, 'node_modules', '@modelcontextprotocol');
const EVERYTHING = path.join(PKG, 'server-everything', 'dist', 'index.js');
const MEMORY = path.join(PKG, 'server-memory', 'dist', 'index.js');
const FILESYSTEM = path.join(PKG, 'server-filesystem', 'dist', 'index.js');
const DIST = path.join(HERE, 'dist', 'proxy.js');

/** Small limits so restarts, kills and expiries happen in milliseconds. */
const FAST: Partial<Limits> = { killGraceMs: 200, restartMinDelayMs: 50, restartMaxDelayMs: 200 };
/** Bound for a child (or group) to disappear: killGraceMs steps (stdin, TERM, KILL) plus scheduling slack. */
const GONE_BOUND_MS = 5_000;

/** Every temporary directory a test made; all are removed when the file's tests are done. */
const TMP_DIRS: string[] = [];
function tmpDir(prefix: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `rmp-${prefix}-`));
  TMP_DIRS.push(dir);
  return dir;
}
after(() => {
  for (const dir of TMP_DIRS) fs.rmSync(dir, { recursive: true, force: true });
});

/** Bounded poll: resolves with the first truthy value of cond(), rejects after timeoutMs. Never a fixed sleep. */
async function waitFor<T>(cond: () => T | Promise<T>, timeoutMs: number, what = 'condition'): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await cond();
    if (value) return value as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Rejects if `p` has not settled within timeoutMs (so a hang fails the test instead of stalling it). */
async function within<T>(p: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not settle within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Live (non-zombie) members of a process group. Linux /proc; zombies are dead, just not yet reaped by init. */
function liveGroupMembers(pgid: number): number[] {
  try {
    process.kill(-pgid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ESRCH') return [];
    throw err;
  }
  // kill(0) succeeded: the group has members. Our PID 1 reaps orphans only every few seconds, and a reaped-late
  // zombie is not a leak, so look at process states.
  const live: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let stat: string;
    try {
      stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
    } catch {
      continue; // exited between readdir and read: not a member any more
    }
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // state ppid pgrp ...
    if (Number(fields[2]) === pgid && fields[0] !== 'Z') live.push(Number(entry));
  }
  return live;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ESRCH') return false;
    throw err;
  }
  try {
    return !/\) Z /.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

/**
 * Asserts that every process group (and extra pid) is gone, polling with a bound. On failure it SIGKILLs the
 * leftovers itself so one failing test does not leak into the next, then fails with the survivors listed.
 * Verified red (on a mutated copy of proxy.ts in /tmp): with signalGroup() signalling only the leader
 * (kill(pid) instead of kill(-pid)), the three grandchild tests in section 10 fail here with the survivors listed.
 */
async function assertAllGone(groups: Iterable<number>, pids: Iterable<number> = [], boundMs = GONE_BOUND_MS): Promise<void> {
  const groupList = [...groups];
  const pidList = [...pids];
  const survivors = () => [...groupList.flatMap((g) => liveGroupMembers(g)), ...pidList.filter(pidAlive)];
  try {
    await waitFor(() => survivors().length === 0, boundMs, 'child process groups to be gone');
  } catch {
    const left = [...new Set(survivors())];
    for (const g of groupList) {
      try {
        process.kill(-g, 'SIGKILL');
      } catch {
        // ESRCH: already gone
      }
    }
    for (const p of pidList) {
      try {
        process.kill(p, 'SIGKILL');
      } catch {
        // ESRCH: already gone
      }
    }
    assert.fail(`leaked processes after close(): ${left.join(', ')} (groups ${groupList.join(', ')})`);
  }
}

/** A started proxy plus everything the leak check needs: every child pid status() ever showed. */
class Harness {
  readonly groups = new Set<number>();
  readonly extraPids = new Set<number>();
  private readonly sampler: NodeJS.Timeout;
  private readonly clients: Client[] = [];

  constructor(readonly proxy: RunningProxy) {
    this.sampler = setInterval(() => this.sample(), 5);
    this.sampler.unref();
  }

  get url(): string {
    return this.proxy.url;
  }

  sample(): void {
    for (const s of Object.values(this.proxy.status())) {
      if (s.pid !== null) this.groups.add(s.pid);
      // `pids` lists every live child, per-session ones included.
      for (const p of (s as { pids?: unknown }).pids instanceof Array ? ((s as { pids: number[] }).pids) : []) this.groups.add(p);
    }
  }

  /** SDK client over Streamable HTTP ('mcp') or legacy HTTP+SSE ('sse'); closed before the proxy on stop(). */
  async client(
    name: string,
    kind: 'mcp' | 'sse',
    headers: Record<string, string> = {},
    capabilities: ConstructorParameters<typeof Client>[1] = {},
  ): Promise<Client> {
    const client = new Client({ name: 'proxy-test', version: '1.0.0' }, capabilities);
    const url = new URL(`${this.url}/${name}/${kind}`);
    const transport =
      kind === 'mcp'
        ? new StreamableHTTPClientTransport(url, { requestInit: { headers } })
        : new SSEClientTransport(url, { requestInit: { headers } });
    this.clients.push(client);
    await client.connect(transport);
    return client;
  }

  async stop(): Promise<void> {
    clearInterval(this.sampler);
    this.sample();
    await Promise.allSettled(this.clients.map((c) => c.close()));
    await this.proxy.close();
    await assertAllGone(this.groups, this.extraPids);
  }
}

async function startHarness(config: Config, options: StartOptions = {}): Promise<Harness> {
  const proxy = await startProxy(config, { host: '127.0.0.1', port: 0, logLevel: 'error', ...options });
  const h = new Harness(proxy);
  h.sample();
  return h;
}

/** Starts a proxy for one test and registers close + leak check on t.after. */
async function harness(t: TestContext, config: Config, options: StartOptions = {}): Promise<Harness> {
  const h = await startHarness(config, options);
  t.after(() => h.stop());
  return h;
}

function srv(name: string, args: string[], extra: Partial<ServerConfig> & Record<string, unknown> = {}): ServerConfig {
  // `secrets` (values masked in every log line) is filled in by parseConfig from ${…} expansions; tests that
  // build a ServerConfig by hand give it here.
  return { name, command: NODE, args, env: {}, sessions: 'shared', secrets: [], ...extra } as ServerConfig;
}
const everything = (name = 'everything'): ServerConfig => srv(name, [EVERYTHING, 'stdio']);

/**
 * Source shared by the fixture servers below: stdin read as JSON lines, each message (a batch is split, what
 * is not an object skipped) handed to the fixture's onMessage(msg). Each fixture says what end of input does.
 */
const STDIN_LINES = String.raw`let buf = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => {
  buf += chunk;
  let i;
  while ((i = buf.indexOf('\n')) >= 0) {
    const line = buf.slice(0, i);
    buf = buf.slice(i + 1);
    let msg;
    try { msg = JSON.parse(line); } catch { continue; }
    for (const m of Array.isArray(msg) ? msg : [msg]) if (m && typeof m === 'object') onMessage(m);
  }
});`;

// A minimal stdio MCP server. argv[1] picks a start-up mode; tools/call {what} picks a behaviour.
const FIXTURE = String.raw`
'use strict';
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const mode = process.argv[1] || 'ok';
if (process.env.FIXTURE_PIDFILE) fs.appendFileSync(process.env.FIXTURE_PIDFILE, process.pid + '\n');
if (mode === 'crash') process.exit(3);
if (mode === 'stderr-env') process.stderr.write('my key is ' + process.env.API_KEY + '\n');
if (mode === 'gcrash') {
  // Each run leaves a grandchild that ignores SIGTERM in this process group, then crashes.
  const g = spawn(process.execPath, ['-e', "process.on('SIGTERM',()=>{});process.stdout.write('up');setInterval(()=>{},1e6)"],
                  { stdio: ['ignore', 'pipe', 'ignore'] });
  g.stdout.once('data', () => { fs.appendFileSync(process.env.FIXTURE_GPIDFILE, g.pid + '\n'); process.exit(3); });
}
// initCaps: the capabilities the child was initialized with; notes: notification methods received;
// responses: answers to requests this child sent (ask, flood), by id.
const seen = { hung: [], cancelled: [], initialize: 0, initCaps: null, notes: [], responses: {} };
const asks = new Map();
let askSeq = 0;
const send = (m) => process.stdout.write(JSON.stringify(m) + '\n');
const reply = (id, result) => send({ jsonrpc: '2.0', id, result });
const text = (id, t) => reply(id, { content: [{ type: 'text', text: String(t) }] });
let buf = '';
let stalled = false;
// slowinit: initialize is answered after FIXTURE_INIT_DELAY_MS, even when stdin closes first (then it exits).
let initPending = false;
let stdinEnded = false;
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => {
  buf += chunk;
  let i;
  while ((i = buf.indexOf('\n')) >= 0) {
    const line = buf.slice(0, i);
    buf = buf.slice(i + 1);
    if (line.trim()) onLine(line);
  }
});
process.stdin.on('end', () => {
  stdinEnded = true;
  if (!initPending) process.exit(0);
});
function onLine(line) {
  let msg;
  try { msg = JSON.parse(line); } catch { return; }
  for (const m of Array.isArray(msg) ? msg : [msg]) onMessage(m);
}
function onMessage(msg) {
  if (msg.method === 'initialize') {
    seen.initialize++;
    seen.initCaps = msg.params && msg.params.capabilities;
    if (process.env.FIXTURE_LOG) fs.appendFileSync(process.env.FIXTURE_LOG, 'initcaps ' + JSON.stringify(seen.initCaps) + '\n');
    if (process.env.FIXTURE_LOG) fs.appendFileSync(process.env.FIXTURE_LOG, 'initialize ' + process.pid + '\n');
    if (mode === 'noinit') return;
    if (mode === 'initerror') return send({ jsonrpc: '2.0', id: msg.id, error: { code: -32603, message: 'bad api key ' + process.env.API_KEY } });
    const answer = () => reply(msg.id, { protocolVersion: msg.params.protocolVersion, capabilities: { tools: {}, resources: { subscribe: true } },
                                         serverInfo: { name: 'fixture', version: '1.0.0' } });
    if (mode === 'slowinit') {
      initPending = true;
      setTimeout(() => {
        initPending = false;
        answer();
        if (stdinEnded) process.exit(0);
      }, Number(process.env.FIXTURE_INIT_DELAY_MS || 300));
      return;
    }
    answer();
    if (mode === 'leak') setImmediate(leak);
    // A paused stdin no longer holds the event loop open: the interval keeps the stalled child alive.
    if (mode === 'stall') { stalled = true; process.stdin.pause(); setInterval(() => {}, 1 << 30); }
    return;
  }
  if (msg.method === 'notifications/cancelled') {
    seen.cancelled.push(msg.params.requestId);
    if (process.env.FIXTURE_LOG) fs.appendFileSync(process.env.FIXTURE_LOG, 'cancelled ' + JSON.stringify(msg.params.requestId) + '\n');
    return;
  }
  if (msg.method === undefined && msg.id !== undefined && msg.id !== null) {
    // An answer (through the proxy) to a request this child sent.
    const outcome = msg.error ? { error: msg.error } : { result: msg.result };
    seen.responses[msg.id] = outcome;
    if (process.env.FIXTURE_LOG) fs.appendFileSync(process.env.FIXTURE_LOG, 'response ' + JSON.stringify(msg.id) + ' ' + JSON.stringify(outcome) + '\n');
    const waiting = asks.get(msg.id);
    if (waiting !== undefined) { asks.delete(msg.id); text(waiting, JSON.stringify(outcome)); }
    return;
  }
  if (msg.id === undefined && typeof msg.method === 'string') {
    seen.notes.push(msg.method);
    if (process.env.FIXTURE_LOG) fs.appendFileSync(process.env.FIXTURE_LOG, 'note ' + msg.method + '\n');
  }
  if (msg.id === undefined || msg.method === undefined) return;
  if (msg.method === 'ping') return reply(msg.id, {});
  if (msg.method === 'resources/subscribe' || msg.method === 'resources/unsubscribe') return reply(msg.id, {});
  if (msg.method === 'tools/list') return reply(msg.id, { tools: [{ name: 'do', inputSchema: { type: 'object' } }] });
  // resources/read: fixture://missing is 2025's "resource not found" (-32002); any other URI is answered with
  // the params exactly as the child received them (JSON in the text).
  if (msg.method === 'resources/read') {
    const uri = msg.params && msg.params.uri;
    if (uri === 'fixture://missing') return send({ jsonrpc: '2.0', id: msg.id, error: { code: -32002, message: 'Resource not found', data: { uri } } });
    return reply(msg.id, { contents: [{ uri, mimeType: 'application/json', text: JSON.stringify(msg.params) }] });
  }
  if (msg.method !== 'tools/call') return send({ jsonrpc: '2.0', id: msg.id, error: { code: -32601, message: 'Method not found' } });
  const a = (msg.params && msg.params.arguments) || {};
  switch (a.what) {
    case 'echo': return text(msg.id, a.text);
    case 'pid': return text(msg.id, process.pid);
    case 'env': return text(msg.id, JSON.stringify(process.env));
    case 'cwd': return text(msg.id, process.cwd());
    case 'hang':
      seen.hung.push(msg.id);
      if (process.env.FIXTURE_LOG) fs.appendFileSync(process.env.FIXTURE_LOG, 'hang ' + JSON.stringify(msg.id) + '\n');
      return;
    case 'seen': return text(msg.id, JSON.stringify(seen));
    case 'raw':
      // Writes a.text as its answer line, with every $ID replaced by this call's id (layouts, duplicates).
      return void process.stdout.write(a.text.split('$ID').join(JSON.stringify(msg.id)) + '\n');
    case 'slow':
      // Answered a.ms later; says on stderr that it started (the proxy logs child stderr at info).
      process.stderr.write('slow started\n');
      return void setTimeout(() => text(msg.id, 'slow done'), a.ms);
    case 'die': process.exit(1);
    case 'garbage':
      process.stdout.write('not json\n{"jsonrpc":"2.0"\n\u0000\u0001\u00ff\n[1,2\n"str"\n{}\n' +
        '{"jsonrpc":"2.0","id":"no-such-id","result":{}}\n{"jsonrpc":"2.0","id":987654321,"result":{}}\n\r\n\n');
      return text(msg.id, 'after garbage');
    case 'cr':
      // Valid JSON with a bare CR as whitespace between tokens (a.pad more bytes of text make the line large).
      process.stdout.write('{"jsonrpc":"2.0","id":' + JSON.stringify(msg.id) + ',\r"result":{"content":[{"type":"text",\r"text":"cr ok' +
        'z'.repeat(a.pad || 0) + '"}]}\r}\n');
      return;
    case 'stderr': process.stderr.write('e'.repeat(a.bytes) + '\n'); return text(msg.id, 'after stderr');
    case 'stderr-var':
      // One stderr line: a.pad x's, the value of environment variable a.name, a.tail y's.
      process.stderr.write('x'.repeat(a.pad) + process.env[a.name] + 'y'.repeat(a.tail) + '\n');
      return text(msg.id, 'after stderr');
    case 'line': {
      // A response whose line is exactly a.bytes bytes long (without the newline).
      const base = JSON.stringify({ jsonrpc: '2.0', id: msg.id, result: { content: [{ type: 'text', text: '' }] } });
      const pad = 'x'.repeat(a.bytes - Buffer.byteLength(base));
      process.stdout.write(JSON.stringify({ jsonrpc: '2.0', id: msg.id, result: { content: [{ type: 'text', text: pad }] } }) + '\n');
      return;
    }
    case 'grandchild': {
      const trap = a.ignoreTerm ? "process.on('SIGTERM',()=>{});" : '';
      const g = spawn(process.execPath, ['-e', trap + "process.stdout.write('up');setInterval(()=>{},1e6)"],
                      { stdio: ['ignore', 'pipe', 'ignore'] });
      // Answer once the grandchild runs (so its SIGTERM handler is installed before anyone stops it).
      g.stdout.once('data', () => { g.stdout.destroy(); text(msg.id, g.pid); });
      return;
    }
    case 'garbage1':
      // A bad line and this call's answer in one write, so they reach the proxy in one chunk.
      process.stdout.write('not json\n' + JSON.stringify({ jsonrpc: '2.0', id: msg.id, result: { content: [{ type: 'text', text: 'after garbage' }] } }) + '\n');
      return;
    case 'ask': {
      // A request to the client (a.method, a.params); this call is answered with the client's answer.
      const id = 'ask-' + (++askSeq);
      asks.set(id, msg.id);
      return send({ jsonrpc: '2.0', id, method: a.method, params: a.params || {} });
    }
    case 'flood':
      // a.count requests to the client at once, then this call is answered; answers land in seen.responses.
      for (let i = 1; i <= a.count; i++) send({ jsonrpc: '2.0', id: 'flood-' + i, method: a.method, params: a.params || {} });
      return text(msg.id, 'sent ' + a.count);
    case 'closeout':
      // Closes stdout and stays alive: this call is never answered by the child.
      process.stdout.end();
      setInterval(() => {}, 1 << 30);
      return;
    case 'deep':
      // An answer nested a.depth arrays deep, its id first (so it cannot be spliced into place).
      process.stdout.write('{"id":' + JSON.stringify(msg.id) + ',"jsonrpc":"2.0","result":{"content":[],"deep":' +
        '['.repeat(a.depth) + ']'.repeat(a.depth) + '}}\n');
      return;
    case 'deepnote':
      process.stdout.write('{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":' +
        '['.repeat(a.depth) + ']'.repeat(a.depth) + '}}\n');
      return text(msg.id, 'after deep');
    case 'bigid': {
      // An answer of more than a.bytes bytes whose own id comes last, after nested "id" keys (decoys).
      const body = { jsonrpc: '2.0', result: { content: [{ type: 'text', text: 'x'.repeat(a.bytes) + ' "id":' + a.decoy, id: a.decoy }],
                                               structuredContent: { id: a.decoy } } };
      const inner = JSON.stringify(body).slice(1, -1);
      // keys 'escaped': a decoy key "i\nd" (not "id"), then the id under the escaped key "\u0069\u0064" (which is "id").
      // keys 'repeated': a decoy "id" first; JSON.parse takes the last one.
      if (a.keys === 'escaped') process.stdout.write('{' + inner + ',"i\\nd":' + JSON.stringify(a.decoy) + ',"\\u0069\\u0064":' + JSON.stringify(msg.id) + '}\n');
      else if (a.keys === 'repeated') process.stdout.write('{"id":' + JSON.stringify(a.decoy) + ',' + inner + ',"id":' + JSON.stringify(msg.id) + '}\n');
      else process.stdout.write('{' + inner + ',"id":' + JSON.stringify(msg.id) + '}\n');
      return;
    }
    case 'dupid':
      // An answer naming its id twice, both times this call's: a splice of the first leaves the second for the client.
      process.stdout.write('{"jsonrpc":"2.0","id":' + JSON.stringify(msg.id) + ',"result":{"content":[{"type":"text","text":"dup' + 'z'.repeat(a.pad || 0) + '"}]},"id":' + JSON.stringify(msg.id) + '}\n');
      return;
    case 'spam':
      // a.count notifications/message of a.bytes bytes each (broadcast to every session), then the answer.
      for (let i = 0; i < a.count; i++) send({ jsonrpc: '2.0', method: 'notifications/message', params: { level: 'info', logger: 'spam', data: 's'.repeat(a.bytes) } });
      return text(msg.id, 'spammed');
    case 'say':
      // One stderr line: a.text with each $NAME replaced by that environment variable.
      process.stderr.write(String(a.text).replace(/\$([A-Z_][A-Z0-9_]*)/g, (m, n) => (process.env[n] === undefined ? m : process.env[n])) + '\n');
      return text(msg.id, 'said');
    default: return send({ jsonrpc: '2.0', id: msg.id, error: { code: -32602, message: 'unknown what' } });
  }
}
// mode 'leak': after initialize, what the log must never show raw: every line of a multi-line secret, a short
// secret standing alone, a static token, a secret used as a stray response id, and control characters.
function leak() {
  const e = process.env;
  process.stderr.write('pem follows\n' + e.PEM + '\n');
  process.stderr.write('pin=' + e.PIN + '.\n' + 'keep abc' + e.PIN + 'def\n');
  process.stderr.write('token ' + e.TOKEN_TEXT + ' here\n');
  process.stderr.write('forged\r2099-01-01T00:00:00.000Z error [other] FORGED \u001b[2K\u0085\u007f end\n');
  send({ jsonrpc: '2.0', id: e.STRAY, result: {} });
  process.stdout.write('END-STDOUT-MARKER\n');
  process.stderr.write('END-STDERR-MARKER\n');
}
`;

function fixture(name: string, mode = 'ok', extra: Partial<ServerConfig> & Record<string, unknown> = {}): ServerConfig {
  return srv(name, ['-e', FIXTURE, mode], extra);
}

// ── Raw HTTP helpers (node:http, so Host/Origin/Content-Type are exactly what the test says) ──────────────

type RawResponse = { status: number; headers: http.IncomingHttpHeaders; text: string };

/** One request on its own connection; `localAddress` picks the source address (any of 127.0.0.0/8 works on lo). */
function request(
  url: string,
  opts: { method?: string; headers?: Record<string, string>; body?: string | Buffer; localAddress?: string } = {},
): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: opts.method ?? 'GET', headers: opts.headers, agent: false, localAddress: opts.localAddress }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('error', reject);
    if (opts.body !== undefined) req.write(opts.body);
    req.end();
  });
}

const JSON_HEADERS = { 'content-type': 'application/json', accept: 'application/json, text/event-stream' };

function post(url: string, body: unknown, headers: Record<string, string> = {}): Promise<RawResponse> {
  return request(url, {
    method: 'POST',
    headers: { ...JSON_HEADERS, ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
}

/** JSON-RPC message(s) in a response body, whether it was sent as application/json or text/event-stream. */
function messages(res: RawResponse): Json[] {
  const type = String(res.headers['content-type'] ?? '');
  if (type.startsWith('text/event-stream')) {
    return parseSse(res.text)
      .filter((e) => e.event === 'message' && e.data !== '')
      .map((e) => JSON.parse(e.data));
  }
  const body = JSON.parse(res.text);
  return Array.isArray(body) ? body : [body];
}

function onlyMessage(res: RawResponse): Json {
  const all = messages(res);
  assert.equal(all.length, 1, `expected one JSON-RPC message, got ${res.text}`);
  return all[0];
}

function assertRpcError(res: RawResponse, status: number, code: number): Json {
  assert.equal(res.status, status, `status (body: ${res.text})`);
  const body = JSON.parse(res.text);
  assert.equal(body.jsonrpc, '2.0');
  assert.equal(body.error?.code, code, `JSON-RPC code (body: ${res.text})`);
  assert.equal(typeof body.error.message, 'string');
  return body;
}

const initMsg = (id: number | string = 0, protocolVersion = '2025-06-18'): Json => ({
  jsonrpc: '2.0',
  id,
  method: 'initialize',
  params: { protocolVersion, capabilities: {}, clientInfo: { name: 'raw-test', version: '1.0.0' } },
});
const ping = (id: number | string): Json => ({ jsonrpc: '2.0', id, method: 'ping' });
const call = (id: number | string, args: Json): Json => ({
  jsonrpc: '2.0',
  id,
  method: 'tools/call',
  params: { name: 'do', arguments: args },
});

/** initialize + notifications/initialized over raw HTTP; returns the session id. */
async function rawSession(base: string, name: string, protocolVersion = '2025-06-18'): Promise<string> {
  const res = await post(`${base}/${name}/mcp`, initMsg(0, protocolVersion), { accept: 'application/json' });
  assert.equal(res.status, 200, res.text);
  const sid = res.headers['mcp-session-id'];
  assert.equal(typeof sid, 'string', 'initialize response carries Mcp-Session-Id');
  const note = await post(
    `${base}/${name}/mcp`,
    { jsonrpc: '2.0', method: 'notifications/initialized' },
    { 'mcp-session-id': sid as string },
  );
  assert.equal(note.status, 202, note.text);
  return sid as string;
}

function sessionHeaders(sid: string, extra: Record<string, string> = {}): Record<string, string> {
  return { accept: 'application/json', 'mcp-session-id': sid, 'mcp-protocol-version': '2025-06-18', ...extra };
}

type SseEvent = { event: string; data: string; id?: string };

function parseSse(text: string): SseEvent[] {
  const events: SseEvent[] = [];
  for (const block of text.replace(/\r\n?/g, '\n').split('\n\n')) {
    let event = 'message';
    let id: string | undefined;
    const data: string[] = [];
    let hasField = false;
    for (const line of block.split('\n')) {
      if (line === '' || line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
      hasField = true;
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
      else if (field === 'id') id = value;
    }
    if (hasField && data.length > 0) events.push({ event, data: data.join('\n'), id });
  }
  return events;
}

/** An open GET event stream read incrementally. */
class SseStream {
  readonly events: SseEvent[] = [];
  comments = 0;
  ended = false;
  private buf = '';

  constructor(
    readonly res: http.IncomingMessage,
    private readonly req: http.ClientRequest,
  ) {
    res.setEncoding('utf8');
    res.on('data', (chunk: string) => this.feed(chunk));
    res.on('close', () => (this.ended = true));
    res.on('error', () => (this.ended = true));
  }

  private feed(chunk: string): void {
    this.buf += chunk;
    const normalized = this.buf.replace(/\r\n?/g, '\n');
    const cut = normalized.lastIndexOf('\n\n');
    if (cut < 0) return;
    const complete = normalized.slice(0, cut);
    this.buf = normalized.slice(cut + 2);
    for (const block of complete.split('\n\n')) if (block.split('\n').some((l) => l.startsWith(':'))) this.comments++;
    this.events.push(...parseSse(complete));
  }

  next(pred: (e: SseEvent) => boolean, timeoutMs: number, what: string): Promise<SseEvent> {
    return waitFor(() => this.events.find(pred), timeoutMs, what);
  }

  close(): void {
    this.req.destroy();
  }
}

function openSse(url: string, headers: Record<string, string> = {}): Promise<SseStream> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { headers: { accept: 'text/event-stream', ...headers }, agent: false }, (res) => {
      resolve(new SseStream(res, req));
    });
    req.on('error', reject);
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

function textOf(result: Json): string {
  return result.content.map((c: Json) => c.text ?? '').join('');
}

/** A startProxy `log` that keeps every line ("level [scope] text") in `lines`, at every level. */
function captureLog(lines: string[]): NonNullable<NonNullable<StartOptions>['log']> {
  const at = (level: string) => (scope: string, text: string) => {
    lines.push(`${level} [${scope}] ${text}`);
  };
  return { error: at('error'), warn: at('warn'), info: at('info'), debug: at('debug'), enabled: () => true };
}

/** Non-empty lines of a file the fixture appends to (FIXTURE_PIDFILE, FIXTURE_LOG); none if it is not there yet. */
function fileLines(file: string): string[] {
  return fs.existsSync(file) ? fs.readFileSync(file, 'utf8').split('\n').filter(Boolean) : [];
}

/**
 * A startProxy `log` like captureLog that, once armed, throws from the first call `match` accepts (an
 * unexpected failure inside the proxy, at a point the test picks); later calls log normally.
 */
type LogMatch = (level: string, scope: string, text: string) => boolean;
function faultyLog(lines: string[]): { log: NonNullable<NonNullable<StartOptions>['log']>; arm(match: LogMatch): void; fired(): boolean } {
  const inner = captureLog(lines);
  let armed: LogMatch | null = null;
  let fired = false;
  const at = (level: 'error' | 'warn' | 'info' | 'debug') => (scope: string, text: string) => {
    if (armed && armed(level, scope, text)) {
      armed = null;
      fired = true;
      throw new Error('injected log failure');
    }
    inner[level](scope, text);
  };
  return {
    log: { error: at('error'), warn: at('warn'), info: at('info'), debug: at('debug'), enabled: () => true },
    arm: (match) => void (armed = match),
    fired: () => fired,
  };
}

/** JSON text of `depth` nested arrays: [[[…]]]. */
const nestedArrays = (depth: number): string => '['.repeat(depth) + ']'.repeat(depth);

type RawHttp = { status: number; headers: Record<string, string>; body: string; raw: string };

/** Sends `payload` on a fresh TCP connection and returns what the server sent before closing it (bounded). */
function rawHttp(port: number, payload: string, timeoutMs = 5_000, host = '127.0.0.1'): Promise<RawHttp> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, host);
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no close within ${timeoutMs} ms; got ${JSON.stringify(Buffer.concat(chunks).toString('latin1').slice(0, 300))}`));
    }, timeoutMs);
    socket.on('connect', () => socket.write(payload));
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    socket.on('error', () => {}); // ECONNRESET after the server closes: what arrived is the answer
    socket.on('close', () => {
      clearTimeout(timer);
      resolve(parseRawHttp(Buffer.concat(chunks).toString('latin1')));
    });
  });
}

function parseRawHttp(raw: string): RawHttp {
  const cut = raw.indexOf('\r\n\r\n');
  const head = cut === -1 ? raw : raw.slice(0, cut);
  const [statusLine = '', ...lines] = head.split('\r\n');
  const headers: Record<string, string> = {};
  for (const line of lines) {
    const colon = line.indexOf(':');
    if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  let body = cut === -1 ? '' : raw.slice(cut + 4);
  if (headers['content-length'] !== undefined) body = body.slice(0, Number(headers['content-length']));
  return { status: Number(/^HTTP\/1\.[01] (\d{3})/.exec(statusLine)?.[1] ?? 0), headers, body, raw };
}

/** An idle TCP connection to the proxy (no request sent); resolves once connected. */
function idleConnection(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1', () => resolve(socket));
    socket.on('error', reject);
  });
}

/** The SDK's error for a JSON-RPC error answer: McpError with `code` and "MCP error CODE: MESSAGE". */
function isMcpError(code: number, message: RegExp | string): (err: unknown) => boolean {
  return (err) => {
    const e = err as { code?: unknown; message?: unknown };
    assert.equal(e.code, code, `JSON-RPC code of ${String(e.message)}`);
    if (typeof message === 'string') assert.equal(e.message, `MCP error ${code}: ${message}`);
    else assert.match(String(e.message), message);
    return true;
  };
}

/** A raw legacy HTTP+SSE session: stream open, initialize answered (with `capabilities`), initialized sent. */
async function legacySession(
  base: string,
  name: string,
  capabilities: Json = {},
  headers: Record<string, string> = {},
): Promise<{ stream: SseStream; endpoint: string; send(msg: Json): Promise<RawResponse>; answer(id: Json, timeoutMs?: number): Promise<Json> }> {
  const stream = await openSse(`${base}/${name}/sse`, headers);
  assert.equal(stream.res.statusCode, 200, `GET /${name}/sse`);
  const ep = await stream.next((e) => e.event === 'endpoint', 5_000, 'endpoint');
  const endpoint = `${base}${ep.data}`;
  const send = (msg: Json) => post(endpoint, msg, headers);
  const answer = async (id: Json, timeoutMs = 10_000) =>
    JSON.parse((await stream.next((e) => e.event === 'message' && JSON.parse(e.data).id === id && JSON.parse(e.data).method === undefined, timeoutMs, `answer ${JSON.stringify(id)}`)).data);
  const init = { jsonrpc: '2.0', id: 'init', method: 'initialize', params: { protocolVersion: '2024-11-05', capabilities, clientInfo: { name: 'raw-sse', version: '1.0.0' } } };
  assert.equal((await send(init)).status, 202);
  const initAnswer = await answer('init', 15_000);
  assert.ok(initAnswer.result, `initialize answered: ${JSON.stringify(initAnswer)}`);
  assert.equal((await send({ jsonrpc: '2.0', method: 'notifications/initialized' })).status, 202);
  return { stream, endpoint, send, answer };
}

// ── Hostile review helpers (issue 8: tests F1–F12) ─────────────────────────────────────────────────────

const KIB = 1024;
const MIB = 1024 * KIB;

/** The environment without MCP_PROXY_* variables, for dist/proxy.js runs. */
function cleanEnv(): Record<string, string | undefined> {
  const env: Record<string, string | undefined> = { ...process.env };
  for (const k of Object.keys(env)) if (k.startsWith('MCP_PROXY_')) delete env[k];
  return env;
}

/**
 * Cleanups of one test, run newest first in a single after hook: node:test skips the remaining after hooks once
 * one throws, so a leak found by one check must not stop the next one from killing its own processes.
 */
const CLEANUPS = new WeakMap<TestContext, (() => unknown)[]>();
function onCleanup(t: TestContext, fn: () => unknown): void {
  let list = CLEANUPS.get(t);
  if (!list) {
    const fns: (() => unknown)[] = [];
    CLEANUPS.set(t, (list = fns));
    t.after(async () => {
      const errors: unknown[] = [];
      for (const f of fns.reverse()) {
        try {
          await f();
        } catch (err) {
          errors.push(err);
        }
      }
      if (errors.length > 0) throw errors[0];
    });
  }
  list.push(fn);
}

/**
 * Starts a proxy for one test whose children write their pid to `pidFile`; on cleanup it is closed and every
 * child in the pid file (per-session children status() may never have shown) is checked gone with the rest.
 */
async function reviewHarness(t: TestContext, config: Config, options: StartOptions, pidFile: string): Promise<Harness> {
  const h = await startHarness(config, options);
  onCleanup(t, async () => {
    for (const line of fileLines(pidFile)) h.groups.add(Number(line));
    await h.stop();
  });
  return h;
}

// A minimal stdio MCP server for the review findings. argv[1] picks a mode: 'ok'; 'noeof' (ignores stdin EOF);
// 'stubborn' (ignores stdin EOF and SIGTERM). tools/call {what} picks a behaviour. FIXTURE_PIDFILE gets its pid;
// FIXTURE_LOG gets "hang ID", "cancelled ID" and "response ID OUTCOME" lines (IDs as the child saw them).
const REVIEW_FIXTURE = String.raw`
'use strict';
const fs = require('node:fs');
const mode = process.argv[1] || 'ok';
if (process.env.FIXTURE_PIDFILE) fs.appendFileSync(process.env.FIXTURE_PIDFILE, process.pid + '\n');
if (mode === 'stubborn') process.on('SIGTERM', () => {});
if (mode === 'stubborn' || mode === 'noeof') setInterval(() => {}, 1 << 30);
const logLine = (s) => { if (process.env.FIXTURE_LOG) fs.appendFileSync(process.env.FIXTURE_LOG, s + '\n'); };
const send = (m) => process.stdout.write(JSON.stringify(m) + '\n');
const reply = (id, result) => send({ jsonrpc: '2.0', id, result });
const text = (id, t) => reply(id, { content: [{ type: 'text', text: String(t) }] });
const hung = [];
const asks = new Map();
let askSeq = 0;
${STDIN_LINES}
process.stdin.on('end', () => { if (mode === 'ok') process.exit(0); });
function onMessage(msg) {
  if (msg.method === 'initialize') {
    return reply(msg.id, { protocolVersion: msg.params.protocolVersion, capabilities: { tools: {}, logging: {} }, serverInfo: { name: 'fixture', version: '1.0.0' } });
  }
  if (msg.method === 'notifications/cancelled') return logLine('cancelled ' + JSON.stringify(msg.params.requestId));
  if (msg.method === undefined && msg.id !== undefined && msg.id !== null) {
    const outcome = msg.error ? { error: msg.error } : { result: msg.result };
    logLine('response ' + JSON.stringify(msg.id) + ' ' + JSON.stringify(outcome));
    const waiting = asks.get(msg.id);
    if (waiting !== undefined) { asks.delete(msg.id); text(waiting, JSON.stringify(outcome)); }
    return;
  }
  if (msg.id === undefined || msg.method === undefined) return;
  if (msg.method === 'ping') return reply(msg.id, {});
  if (msg.method !== 'tools/call') return send({ jsonrpc: '2.0', id: msg.id, error: { code: -32601, message: 'Method not found' } });
  const a = (msg.params && msg.params.arguments) || {};
  switch (a.what) {
    case 'echo': return text(msg.id, a.text);
    case 'pid': return text(msg.id, process.pid);
    case 'hang': hung.push(msg.id); return logLine('hang ' + JSON.stringify(msg.id));
    case 'release':
      // Answers every request left hanging (late, perhaps after a cancel), then this one.
      for (const id of hung.splice(0)) text(id, 'late');
      return text(msg.id, 'released');
    case 'line': {
      // An answer of exactly a.bytes bytes (without the newline).
      const base = JSON.stringify({ jsonrpc: '2.0', id: msg.id, result: { content: [{ type: 'text', text: '' }] } });
      return text(msg.id, 'x'.repeat(a.bytes - Buffer.byteLength(base)));
    }
    case 'ask': {
      // A request to the client; this call is answered with the client's answer ({result} or {error}).
      const id = 'ask-' + (++askSeq);
      asks.set(id, msg.id);
      return send({ jsonrpc: '2.0', id, method: a.method, params: a.params || {} });
    }
    case 'floodsame':
      // a.count requests to the client, all under the id a.id; a notification marks the end; then the answer.
      for (let i = 0; i < a.count; i++) send({ jsonrpc: '2.0', id: a.id, method: a.method, params: a.params || {} });
      send({ jsonrpc: '2.0', method: 'notifications/message', params: { level: 'info', data: 'flood-done' } });
      return text(msg.id, 'sent ' + a.count);
    case 'deepreq':
      // A request of the child's own under the number a.id, nested a.depth arrays deep.
      process.stdout.write('{"jsonrpc":"2.0","id":' + a.id + ',"method":"elicitation/create","params":{"message":"q","x":' + '['.repeat(a.depth) + ']'.repeat(a.depth) + '}}\n');
      return text(msg.id, 'sent');
    case 'bigreq':
      // A request of the child's own under the number a.id, a.bytes long.
      process.stdout.write('{"jsonrpc":"2.0","id":' + a.id + ',"method":"elicitation/create","params":{"message":"' + 'q'.repeat(a.bytes) + '"}}\n');
      return text(msg.id, 'sent');
    case 'sayenc': {
      // The value of $Q on stderr in the forms other programs write it, one line each, then a line of bidi marks.
      const v = process.env.Q;
      const json = JSON.stringify(v).slice(1, -1);
      const ascii = json.replace(/[\u0080-\uffff]/g, (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'));
      const forms = [ascii, ascii.replace(/\\u([0-9a-f]{4})/g, (m, h) => '\\u' + h.toUpperCase()), json.replace(/\//g, '\\/'),
        ascii.replace(/\//g, '\\/'), encodeURIComponent(v), encodeURIComponent(v).replace(/%20/g, '+')];
      forms.forEach((f, i) => process.stderr.write('form-' + i + ': ' + f + '\n'));
      process.stderr.write('bidi \u202e evil \u2028 ls \u2029 ps \u200f rlm \u2066 iso end\n');
      return text(msg.id, 'said');
    }
    default: return send({ jsonrpc: '2.0', id: msg.id, error: { code: -32602, message: 'unknown what' } });
  }
}
`;

function reviewFixture(name: string, mode: string, env: Record<string, string>, extra: Partial<ServerConfig> & Record<string, unknown> = {}): ServerConfig {
  return srv(name, ['-e', REVIEW_FIXTURE, mode], { env, ...extra });
}

/** Fixture files of one test: pid file and fixture log. */
function reviewFiles(prefix: string): { pidFile: string; log: string } {
  const dir = tmpDir(prefix);
  return { pidFile: path.join(dir, 'pids'), log: path.join(dir, 'fixture.log') };
}

/** initialize (with `caps`, at `version`) + notifications/initialized; returns the session id. */
async function reviewSession(base: string, name: string, opts: { version?: string; caps?: Json } = {}): Promise<string> {
  const init = initMsg(0, opts.version);
  init.params.capabilities = opts.caps ?? {};
  const res = await post(`${base}/${name}/mcp`, init, { accept: 'application/json' });
  assert.equal(res.status, 200, res.text);
  const sid = String(res.headers['mcp-session-id']);
  const note = await post(`${base}/${name}/mcp`, { jsonrpc: '2.0', method: 'notifications/initialized' }, { 'mcp-session-id': sid });
  assert.equal(note.status, 202, note.text);
  return sid;
}

/** Session headers without MCP-Protocol-Version (sessionHeaders() sends 2025-06-18; F1 negotiates 2025-03-26). */
function reviewHeaders(sid: string): Record<string, string> {
  return { accept: 'application/json', 'mcp-session-id': sid };
}

/** The text of a tools/call answer sent as application/json. */
const answerText = (res: RawResponse): string => textOf(JSON.parse(res.text).result);

/** An event stream opened by GET, or by a POST answered as text/event-stream. */
function openRpcStream(url: string, opts: { method?: string; headers?: Record<string, string>; body?: string } = {}): Promise<SseStream> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: opts.method ?? 'GET', headers: { accept: 'text/event-stream', ...opts.headers }, agent: false }, (res) => {
      resolve(new SseStream(res, req));
    });
    req.on('error', reject);
    if (opts.body !== undefined) req.write(opts.body);
    req.end();
  });
}

/** The JSON-RPC messages a stream has carried so far. */
function streamMessages(stream: SseStream): Json[] {
  return stream.events.filter((e) => e.event === 'message').map((e) => JSON.parse(e.data));
}

/** The first JSON-RPC message on a stream that `pred` accepts (bounded wait). */
function nextMessage(stream: SseStream, pred: (m: Json) => boolean, timeoutMs: number, what: string): Promise<Json> {
  return waitFor(() => streamMessages(stream).find(pred), timeoutMs, what);
}

const rawPost = (sid: string, body: string, extra = ''): string =>
  `POST /fix/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json\r\nMcp-Session-Id: ${sid}\r\n${extra}Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;

/** Rejects with the error of a request the server cut off (no response): ECONNRESET "socket hang up". */
const isHangUp = (err: unknown): boolean => {
  assert.equal((err as NodeJS.ErrnoException).code, 'ECONNRESET', String(err));
  return true;
};
// ── 0. Layout ───────────────────────────────────────────────────────────────────────────────────────────

describe('0. proxy.ts layout', () => {
  it('the Contents list in the header matches the section banners, in order', () => {
    const src = fs.readFileSync(path.join(HERE, 'proxy.ts'), 'utf8').split('\n');
    const banners = src
      .map((l) => /^\/\/ ── (\d+)\. (.+?) ─+\s*$/.exec(l))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => ({ n: Number(m[1]), title: m[2]!.trim() }));
    assert.ok(banners.length >= 5, 'has section banners');
    assert.deepEqual(
      banners.map((b) => b.n),
      banners.map((_, i) => i + 1),
      'banners are numbered 1..N in file order',
    );
    const start = src.findIndex((l) => /^\/\/\s*Contents\s*$/.test(l));
    assert.ok(start >= 0, 'header has a Contents list');
    const contents = new Map<number, string>();
    for (let i = start + 1; i < src.length && src[i]!.startsWith('//') && src[i]!.trim() !== '//'; i++) {
      for (const m of src[i]!.slice(2).matchAll(/(\d+)\.\s+(.+?)(?=\s{2,}\d+\.|\s*$)/g)) contents.set(Number(m[1]), m[2]!.trim());
    }
    assert.deepEqual(
      new Map(banners.map((b) => [b.n, b.title])),
      contents,
      'Contents entries equal the banners',
    );
  });
});

// ── 1. Limits and defaults ──────────────────────────────────────────────────────────────────────────────

describe('1. Limits and defaults', () => {
  it('DEFAULT_LIMITS is frozen and holds the documented values', () => {
    assert.ok(Object.isFrozen(DEFAULT_LIMITS));
    const MIB = 1024 * 1024;
    const documented: Record<string, number> = {
      maxBodyBytes: 4 * MIB,
      maxLineBytes: 10 * MIB,
      maxStderrLineBytes: 4096,
      maxSessionsPerServer: 20_000,
      maxSessionsPerCredential: 2_000,
      requestsPerMinute: 1_200,
      requestBurst: 200,
      maxPendingPerSession: 1024,
      maxBatchSize: 100,
      maxQueuedBytesPerConnection: 4 * MIB,
      maxQueuedBytesTotal: 64 * MIB,
      maxBodyBytesInFlight: 16 * MIB,
      maxJsonDepth: 128,
      maxConnections: 16_384,
      maxServerRequestsPerChild: 64,
      maxChildrenPerCredential: 8,
      maxChildQueueBytes: 16 * MIB,
      maxChildrenPerServer: 16,
      sessionIdleMs: 30 * 60_000,
      sweepIntervalMs: 10_000,
      sseKeepaliveMs: 15_000,
      initTimeoutMs: 120_000,
      requestTimeoutMs: 300_000,
      killGraceMs: 2_000,
      restartMinDelayMs: 1_000,
      restartMaxDelayMs: 30_000,
      stableUptimeMs: 10_000,
      maxUnstableRestarts: 5,
      startConcurrency: 4,
      retryAfterS: 5,
      headersTimeoutMs: 10_000,
      httpRequestTimeoutMs: 60_000,
      connectionsCheckIntervalMs: 1_000,
      maxHeadersCount: 100,
      startWaitMs: 30_000,
      continuationTtlMs: 120_000,
      listTtlMs: 60_000,
      maxLaneQueue: 256,
      tlsRetryMs: 60_000,
    };
    const actual = DEFAULT_LIMITS as unknown as Record<string, unknown>;
    for (const [key, value] of Object.entries(documented)) assert.equal(actual[key], value, key);
    assert.equal(actual.maxSseQueueBytes, undefined, 'renamed to maxQueuedBytesPerConnection');
    // Extra limits (Node's own server timeouts, P3) are allowed; every limit is a positive integer.
    for (const [key, value] of Object.entries(actual)) {
      assert.ok(Number.isInteger(value) && (value as number) > 0, `${key} = ${String(value)}`);
    }
  });

  it('DEFAULT_LIMITS cannot be changed at run time', () => {
    const limits = DEFAULT_LIMITS as { maxBodyBytes: number };
    assert.throws(() => {
      limits.maxBodyBytes = 1; // ES modules are strict: writing a frozen property throws
    }, TypeError);
    assert.equal(DEFAULT_LIMITS.maxBodyBytes, 4 * 1024 * 1024);
  });
});

// ── 2. Types ────────────────────────────────────────────────────────────────────────────────────────────
// Types have no run-time behaviour; `npx tsc --noEmit` checks them (this file uses Config, Limits and
// RunningProxy as proxy.ts declares them).

// ── 3. Small utilities ──────────────────────────────────────────────────────────────────────────────────

describe('3. Small utilities', () => {
  it('tokenMatches() accepts any configured token exactly', () => {
    const tokens = ['alpha-token-0000001', 'beta-token-00000022', 'γάμμα-token-0000003'];
    for (const tok of tokens) assert.equal(tokenMatches(tok, tokens), true, tok);
  });

  it('tokenMatches() rejects prefixes, extensions, case changes, empty and near misses', () => {
    const tokens = ['alpha-token-0000001', 'beta-token-00000022'];
    for (const bad of ['', 'alpha-token-000000', 'alpha-token-00000011', 'ALPHA-TOKEN-0000001', 'alpha-token-0000002', ' alpha-token-0000001', 'beta-token-0000002\u0000']) {
      assert.equal(tokenMatches(bad, tokens), false, JSON.stringify(bad));
    }
  });

  it('tokenMatches() with no configured tokens accepts nothing', () => {
    assert.equal(tokenMatches('', []), false);
    assert.equal(tokenMatches('anything', []), false);
  });
});

// ── 4. Config: load, validate, diff ─────────────────────────────────────────────────────────────────────

describe('4. Config: load, validate, diff', () => {
  describe('diffConfigs(), by server name', () => {
    const base = (name: string, extra: Partial<ServerConfig> = {}) => srv(name, ['a.js'], extra);
    const names = (list: readonly { name: string }[]) => list.map((s) => s.name).sort();

    it('sorts every server into added, removed, changed (naming the fields), updated in place, unchanged', () => {
      const before = { servers: [
        base('same'), base('gone'), base('cmd'), base('args'), base('env', { env: { A: '1', B: '2' } }), base('cwd'),
        base('mode'), base('roots'), base('caps'), base('line'), base('ttl'), base('idle'), base('start', { startTimeoutMs: 5_000 }),
      ] };
      const after = { servers: [
        base('same'), base('new'), { ...base('cmd'), command: '/usr/bin/other' }, base('args', { args: ['b.js'] }),
        base('env', { env: { A: '1', B: 'rotated', C: 'x' } }), base('cwd', { cwd: '/tmp' }), base('mode', { sessions: 'per-session' }),
        base('roots', { roots: ['/data'] }), base('caps', { clientCapabilities: ['sampling'] }), base('line', { maxLineBytes: 1_000 }),
        base('ttl', { listTtlMs: 0 }), base('idle', { idleTimeoutMs: 60_000 }), base('start', { startTimeoutMs: 90_000 }),
      ] };
      const diff = diffConfigs(before, after);
      assert.deepEqual(names(diff.added), ['new']);
      assert.deepEqual(names(diff.removed), ['gone']);
      assert.deepEqual(names(diff.unchanged), ['same']);
      assert.deepEqual(names(diff.updated), ['idle', 'start', 'ttl']);
      assert.deepEqual(Object.fromEntries(diff.changed.map((c) => [c.config.name, c.fields])), {
        cmd: ['command'], args: ['args'], env: ['env.B', 'env.C'], cwd: ['cwd'], mode: ['sessions'], roots: ['roots'],
        caps: ['clientCapabilities'], line: ['maxLineBytes'],
      });
      // The new config's objects are what the diff hands back (the running server takes them).
      assert.equal(diff.changed.find((c) => c.config.name === 'env')!.config, after.servers[4]);
    });

    it('names changed variables, never their values; a rotated ${file:} secret is an env change of its server only', () => {
      const dir = tmpDir('diff');
      const secret = path.join(dir, 'token');
      const text = JSON.stringify({ mcpServers: {
        uses: { command: 'x', env: { TOKEN: `\${file:${secret}}` } }, other: { command: 'y', env: { PLAIN: 'p' } },
      } });
      fs.writeFileSync(secret, 'old-secret-value-1234\n');
      const before = parseConfig(text, 'c.json');
      assert.deepEqual(before.config!.servers[0]!.secretFiles, [secret]);
      fs.writeFileSync(secret, 'new-secret-value-5678\n');
      const diff = diffConfigs(before.config!, parseConfig(text, 'c.json').config!);
      assert.deepEqual(diff.changed.map((c) => [c.config.name, c.fields]), [['uses', ['env.TOKEN']]]);
      assert.deepEqual(names(diff.unchanged), ['other']);
      assert.doesNotMatch(JSON.stringify(diff.changed.map((c) => c.fields)), /secret-value/);
    });

    it('argument order and array contents count; object key order does not; equal configs give an empty diff', () => {
      const a = { servers: [base('s', { args: ['1', '2'], env: { X: '1', Y: '2' }, clientCapabilities: ['sampling', 'elicitation'] })] };
      const sameButReordered = { servers: [base('s', { args: ['1', '2'], env: { Y: '2', X: '1' }, clientCapabilities: ['sampling', 'elicitation'] })] };
      const swapped = { servers: [base('s', { args: ['2', '1'], env: { X: '1', Y: '2' }, clientCapabilities: ['sampling', 'elicitation'] })] };
      assert.deepEqual(diffConfigs(a, sameButReordered), { added: [], removed: [], changed: [], updated: [], unchanged: [sameButReordered.servers[0]] });
      assert.deepEqual(diffConfigs(a, swapped).changed.map((c) => c.fields), [['args']]);
      assert.deepEqual(diffConfigs(a, { servers: [] }).removed, a.servers);
      // A renamed server (even only its case) is a removal and an addition: names are the config's keys.
      const renamed = diffConfigs(a, { servers: [base('S', { args: ['1', '2'] })] });
      assert.deepEqual([names(renamed.removed), names(renamed.added)], [['s'], ['S']]);
    });
  });

  const parse = (obj: unknown, env: Record<string, string | undefined> = {}, readFile?: (p: string) => string) =>
    parseConfig(typeof obj === 'string' ? obj : JSON.stringify(obj), 'config.json', env, readFile);
  const byName = (servers: readonly ServerConfig[], name: string) => {
    const s = servers.find((x) => x.name === name);
    assert.ok(s, `server ${name} present`);
    return s;
  };

  it('parseConfig() loads a real-world claude_desktop_config.json unchanged, ignoring unknown top-level keys', () => {
    const file = {
      globalShortcut: 'Ctrl+Space',
      preferences: { menuBarEnabled: false },
      mcpServers: {
        filesystem: { command: 'npx', args: ['-y', '@modelcontextprotocol/server-filesystem', '/Users/me/Desktop', '/Users/me/Downloads'] },
        github: {
          command: 'docker',
          args: ['run', '-i', '--rm', '-e', 'GITHUB_PERSONAL_ACCESS_TOKEN', 'ghcr.io/github/github-mcp-server'],
          env: { GITHUB_PERSONAL_ACCESS_TOKEN: 'ghp_literal_value' },
        },
        time: { command: 'uvx', args: ['mcp-server-time', '--local-timezone=America/New_York'] },
        plain: { command: 'mcp-server-plain' },
      },
    };
    const { config, errors, warnings } = parse(file);
    assert.deepEqual(errors, []);
    assert.deepEqual(warnings, []);
    assert.ok(config);
    assert.deepEqual(config.servers.map((s) => s.name), ['filesystem', 'github', 'time', 'plain'], 'file order kept');
    for (const [name, entry] of Object.entries(file.mcpServers) as [string, Json][]) {
      const s = byName(config.servers, name);
      assert.equal(s.command, entry.command);
      assert.deepEqual([...s.args], entry.args ?? []);
      assert.deepEqual({ ...s.env }, entry.env ?? {});
      assert.equal(s.cwd, undefined);
      assert.equal(s.sessions, 'shared', 'one shared child per server is the default');
    }
  });

  it('parseConfig() accepts the cwd and sessions extensions and type "stdio"', () => {
    const { config, errors } = parse({
      mcpServers: {
        a: { type: 'stdio', command: 'x', cwd: '/srv/a', sessions: 'per-session' },
        b: { command: 'y', sessions: 'shared' },
      },
    });
    assert.deepEqual(errors, []);
    assert.ok(config);
    assert.equal(byName(config.servers, 'a').cwd, '/srv/a');
    assert.equal(byName(config.servers, 'a').sessions, 'per-session');
    assert.equal(byName(config.servers, 'b').sessions, 'shared');
  });

  it('parseConfig() skips "disabled": true servers without an error', () => {
    const { config, errors } = parse({ mcpServers: { off: { command: 'x', disabled: true }, on: { command: 'y' } } });
    assert.deepEqual(errors, []);
    assert.ok(config);
    assert.deepEqual(config.servers.map((s) => s.name), ['on']);
  });

  it('parseConfig() skips a remote (url) entry with exactly one warning naming it', () => {
    const { config, errors, warnings } = parse({
      mcpServers: { remote: { url: 'https://mcp.example.com/mcp' }, local: { command: 'y' } },
    });
    assert.deepEqual(errors, []);
    assert.ok(config);
    assert.deepEqual(config.servers.map((s) => s.name), ['local']);
    assert.equal(warnings.length, 1, warnings.join('\n'));
    assert.match(warnings[0]!, /remote/);
  });

  it('parseConfig() skips type sse, http and streamable-http entries, warning for each', () => {
    const { config, errors, warnings } = parse({
      mcpServers: {
        s1: { type: 'sse', url: 'https://a.example/sse' },
        s2: { type: 'http', url: 'https://b.example/mcp' },
        s3: { type: 'streamable-http', url: 'https://c.example/mcp' },
        ok: { command: 'x' },
      },
    });
    assert.deepEqual(errors, []);
    assert.ok(config);
    assert.deepEqual(config.servers.map((s) => s.name), ['ok']);
    for (const name of ['s1', 's2', 's3']) assert.ok(warnings.some((w) => w.includes(name)), `warning names ${name}`);
  });

  it('parseConfig() accepts any name with a letter or digit, up to 200 characters (a real file loads unchanged); longer, or without one, is refused', () => {
    const names = ['MCP SQLite Server', '.hidden', '-dash', '_under', 'a/b', 'Café ☕ tools', 'b'.repeat(200)];
    const ok = parse({ mcpServers: Object.fromEntries(names.map((name) => [name, { command: 'x' }])) });
    assert.deepEqual(ok.errors, []);
    assert.deepEqual(ok.config?.servers.map((s) => s.name), names);
    for (const name of ['', '!!!', 'ü', ' ', '_', '-_-', 'c'.repeat(201)]) {
      const bad = parse({ mcpServers: { [name]: { command: 'x' } } });
      assert.equal(bad.config, null, `name ${JSON.stringify(name)} refused`);
      assert.equal(bad.errors.length, 1, bad.errors.join('\n'));
      assert.match(bad.errors[0]!, /invalid server name/);
    }
  });

  it('serverSegment() derives the URL segment: lowercase, runs of other characters → "-", no leading or trailing "." or "-", at most 63 characters', () => {
    const cases: [string, string][] = [
      ['MCP SQLite Server', 'mcp-sqlite-server'], ['memory', 'memory'], ['A.b_c-9', 'a.b_c-9'], ['.hidden', 'hidden'],
      ['a/b', 'a-b'], ['a%2e', 'a-2e'], ['Café ☕ tools', 'caf-tools'], ['..', ''], ['x'.repeat(70), 'x'.repeat(63)],
      [`${'y'.repeat(62)} z`, 'y'.repeat(62)],
    ];
    for (const [name, segment] of cases) assert.equal(serverSegment(name), segment, JSON.stringify(name));
  });

  it('parseConfig() takes per-server "idleTimeoutMs" and "startTimeoutMs" (milliseconds, 1 s … 1 day) and names the field of a bad one', () => {
    const ok = parse({ mcpServers: { a: { command: 'x', idleTimeoutMs: 60_000, startTimeoutMs: 300_000 }, b: { command: 'x' } } });
    assert.deepEqual(ok.errors, []);
    assert.equal(ok.config?.servers[0]!.idleTimeoutMs, 60_000);
    assert.equal(ok.config?.servers[0]!.startTimeoutMs, 300_000);
    assert.equal(ok.config?.servers[1]!.idleTimeoutMs, undefined);
    for (const [field, value] of [['idleTimeoutMs', 999], ['idleTimeoutMs', '60000'], ['startTimeoutMs', 1.5], ['startTimeoutMs', 86_400_001]] as const) {
      const bad = parse({ mcpServers: { a: { command: 'x', [field]: value } } });
      assert.equal(bad.config, null, `${field}: ${value}`);
      assert.match(bad.errors[0]!, new RegExp(`mcpServers\\.a\\.${field}: got .*, expected an integer from 1000 to 86400000 \\(milliseconds\\)`));
    }
  });

  it('parseConfig() refuses only names that make the same URL segment, naming both entries', () => {
    const { config, errors } = parse({ mcpServers: { 'My Server': { command: 'x' }, 'my-server': { command: 'x' }, other: { command: 'x' } } });
    assert.equal(config, null);
    assert.deepEqual(errors, ['config.json: mcpServers "My Server" and "my-server" both make the URL segment "my-server"; rename one']);
  });

  it('parseConfig() names file, server, field, type got and type expected for wrong types', () => {
    const { config, errors } = parse({ mcpServers: { memory: { command: 'npx', args: 5 } } });
    assert.equal(config, null);
    assert.equal(errors.length, 1);
    assert.match(errors[0]!, /config\.json/);
    assert.match(errors[0]!, /mcpServers\.memory\.args/);
    assert.match(errors[0]!, /got number/);
    assert.match(errors[0]!, /expected an array of strings/);
  });

  it('parseConfig() rejects each wrongly typed field with one error naming server and field', () => {
    const cases: [Json, string, string][] = [
      [{ command: 5 }, 'command', 'number'],
      [{}, 'command', 'undefined'],
      [{ command: '' }, 'command', 'string'],
      [{ command: 'x', args: ['ok', 7] }, 'args', 'number'],
      [{ command: 'x', args: 'a b' }, 'args', 'string'],
      [{ command: 'x', env: ['A=1'] }, 'env', 'array'],
      [{ command: 'x', env: { A: 1 } }, 'env', ''],
      [{ command: 'x', env: 'A=1' }, 'env', 'string'],
      [{ command: 'x', cwd: 3 }, 'cwd', 'number'],
      [{ command: 'x', sessions: 'sometimes' }, 'sessions', 'string'],
      [{ command: 'x', disabled: 'yes' }, 'disabled', 'string'],
      ['npx -y server', '', 'string'],
      [null, '', 'null'],
    ];
    for (const [entry, field, got] of cases) {
      const { config, errors } = parse({ mcpServers: { srv1: entry } });
      const label = JSON.stringify(entry);
      assert.equal(config, null, label);
      assert.equal(errors.length, 1, `${label}: ${errors.join(' | ')}`);
      assert.match(errors[0]!, /srv1/, label);
      if (field) assert.ok(errors[0]!.includes(field), `${label}: ${errors[0]} names ${field}`);
      if (got === 'number' || got === 'array' || got === 'null') assert.ok(errors[0]!.includes(got), `${label}: ${errors[0]} says got ${got}`);
    }
  });

  it('parseConfig() rejects bad top-level shapes and invalid JSON, naming the source', () => {
    for (const text of ['{"mcpServers": [] }', '[]', '"x"', '{"mcpServers": {"a": {"command": "x"}', '', '{"mcpServers": 3}']) {
      const { config, errors } = parseConfig(text, 'my-config.json', {});
      assert.equal(config, null, text);
      assert.ok(errors.length >= 1, text);
      assert.ok(errors.every((e) => e.includes('my-config.json')), `${text}: ${errors.join(' | ')}`);
    }
  });

  it('parseConfig() reports every bad server, one line each', () => {
    const { config, errors } = parse({ mcpServers: { one: { command: 1 }, two: { command: 'x', args: {} }, fine: { command: 'y' } } });
    assert.equal(config, null);
    assert.equal(errors.length, 2, errors.join('\n'));
    assert.ok(errors.some((e) => e.includes('one')));
    assert.ok(errors.some((e) => e.includes('two')));
    for (const e of errors) assert.ok(!e.includes('\n'), 'one line each');
  });

  it('parseConfig() expands ${VAR} and ${VAR:-default} in args and env values', () => {
    const env = { HOME_DIR: '/home/u', TOKEN: 'tok', EMPTYDEF: undefined };
    const { config, errors } = parse(
      {
        mcpServers: {
          s: {
            command: 'x',
            args: ['--root=${HOME_DIR}/data', '${TOKEN}', '${MISSING:-fallback}', 'a${TOKEN}b${HOME_DIR}c', 'plain'],
            env: { T: '${TOKEN}', D: '${EMPTYDEF:-/tmp/default.jsonl}', S: '${TOKEN:-unused}', L: 'literal' },
          },
        },
      },
      env,
    );
    assert.deepEqual(errors, []);
    assert.ok(config);
    const s = byName(config.servers, 's');
    assert.deepEqual([...s.args], ['--root=/home/u/data', 'tok', 'fallback', 'atokb/home/uc', 'plain']);
    assert.deepEqual({ ...s.env }, { T: 'tok', D: '/tmp/default.jsonl', S: 'tok', L: 'literal' });
  });

  it('parseConfig() fails on an unset ${VAR} without default, naming server and variable', () => {
    const { config, errors } = parse({ mcpServers: { gh: { command: 'x', env: { T: '${GITHUB_TOKEN}' } } } }, {});
    assert.equal(config, null);
    assert.equal(errors.length, 1);
    assert.match(errors[0]!, /gh/);
    assert.match(errors[0]!, /GITHUB_TOKEN/);
    const inArgs = parse({ mcpServers: { db: { command: 'x', args: ['${DB_URL}'] } } }, {});
    assert.equal(inArgs.config, null);
    assert.match(inArgs.errors.join('\n'), /db/);
    assert.match(inArgs.errors.join('\n'), /DB_URL/);
  });

  it('parseConfig() reads ${file:/path} with the trailing newline trimmed', () => {
    const dir = tmpDir('cfg');
    const secretPath = path.join(dir, 'secret.txt');
    fs.writeFileSync(secretPath, 'file-secret-value\n');
    const { config, errors } = parse({ mcpServers: { s: { command: 'x', args: ['--key', `\${file:${secretPath}}`], env: { K: `\${file:${secretPath}}` } } } });
    assert.deepEqual(errors, []);
    assert.ok(config);
    assert.deepEqual([...byName(config.servers, 's').args], ['--key', 'file-secret-value']);
    assert.equal(byName(config.servers, 's').env.K, 'file-secret-value');

    const asked: string[] = [];
    const injected = parse({ mcpServers: { s: { command: 'x', env: { K: '${file:/run/secrets/k}' } } } }, {}, (p) => {
      asked.push(p);
      return 'injected\n';
    });
    assert.deepEqual(injected.errors, []);
    assert.deepEqual(asked, ['/run/secrets/k']);
    assert.equal(injected.config?.servers[0]?.env.K, 'injected');
  });

  it('parseConfig() fails on an unreadable ${file:...}, naming the server', () => {
    const missing = path.join(tmpDir('cfg'), 'nope.txt');
    const { config, errors } = parse({ mcpServers: { vault: { command: 'x', env: { K: `\${file:${missing}}` } } } });
    assert.equal(config, null);
    assert.equal(errors.length, 1);
    assert.match(errors[0]!, /vault/);
  });

  it('parseConfig() never puts a secret value into errors or warnings', () => {
    const dir = tmpDir('cfg');
    const secretFile = path.join(dir, 's.txt');
    fs.writeFileSync(secretFile, 'FILE-SECRET-4711\n');
    const env = { API_KEY: 'ENV-SECRET-0815' };
    const { config, errors, warnings } = parse(
      {
        mcpServers: {
          good: { command: 'x', args: ['--key=${API_KEY}'], env: { F: `\${file:${secretFile}}` } },
          strtype: { command: 'x', args: '--token=ARGS-SECRET-1234' },
          envnum: { command: 'x', env: { TOKEN: 987654321987 } },
          unset: { command: 'x', env: { A: '${API_KEY}', B: '${NOT_SET_ANYWHERE}' } },
          remote: { type: 'http', url: 'https://mcp.example.com/mcp', headers: { Authorization: 'Bearer HEADER-SECRET-42' } },
        },
      },
      env,
    );
    assert.equal(config, null);
    assert.ok(errors.length >= 3, errors.join('\n'));
    const all = [...errors, ...warnings].join('\n');
    for (const secret of ['ENV-SECRET-0815', 'FILE-SECRET-4711', 'ARGS-SECRET-1234', '987654321987', 'HEADER-SECRET-42']) {
      assert.ok(!all.includes(secret), `"${secret}" leaked into: ${all}`);
    }
  });

  it('loadConfigFile() reads a file from disk and gives the same result as parseConfig()', () => {
    const dir = tmpDir('cfg');
    const file = path.join(dir, 'config.json');
    const text = JSON.stringify({ mcpServers: { m: { command: 'node', args: ['${X:-d}'], env: { Y: '${X:-d}' } } } });
    fs.writeFileSync(file, text);
    const loaded = loadConfigFile(file, { X: 'val' });
    const parsed = parseConfig(text, file, { X: 'val' });
    assert.deepEqual(loaded.errors, []);
    assert.deepEqual(loaded, parsed);
    assert.deepEqual([...(loaded.config?.servers[0]?.args ?? [])], ['val']);
  });

  it('loadConfigFile() turns a read error into an error naming the path', () => {
    const missing = path.join(tmpDir('cfg'), 'missing.json');
    const res = loadConfigFile(missing, {});
    assert.equal(res.config, null);
    assert.equal(res.errors.length, 1);
    assert.ok(res.errors[0]!.includes(missing), res.errors[0]);
    assert.equal(res.errors[0], `${missing}: cannot read the config file (ENOENT)`);
    const dir = tmpDir('cfg');
    const asDir = loadConfigFile(dir, {});
    assert.equal(asDir.config, null);
    assert.equal(asDir.errors.length, 1);
    assert.ok(asDir.errors[0]!.startsWith(`${dir}: `), asDir.errors[0]);
  });

  // Regression: roots come from the operator, never from a client.
  it('parseConfig() accepts "roots" as absolute paths and rejects anything else, naming roots[i]', () => {
    const ok = parse({ mcpServers: { fs: { command: 'x', roots: ['/srv/data', '/home/me/projects'] } } });
    assert.deepEqual(ok.errors, []);
    assert.deepEqual([...((byName(ok.config!.servers, 'fs') as Json).roots ?? [])], ['/srv/data', '/home/me/projects']);
    assert.equal((byName(parse({ mcpServers: { fs: { command: 'x' } } }).config!.servers, 'fs') as Json).roots, undefined, 'no roots unless configured');
    for (const bad of ['relative/dir', '', './x', 'a\u0000b', 7, null]) {
      const { config, errors } = parse({ mcpServers: { fs: { command: 'x', roots: [bad] } } });
      assert.equal(config, null, JSON.stringify(bad));
      assert.equal(errors.length, 1, `${JSON.stringify(bad)}: ${errors.join(' | ')}`);
      assert.match(errors[0]!, /^config\.json: mcpServers\.fs\.roots\[0\]: got .+, expected an absolute path$/, JSON.stringify(bad));
    }
    const second = parse({ mcpServers: { fs: { command: 'x', roots: ['/ok', 'nope'] } } });
    assert.match(second.errors.join('\n'), /^config\.json: mcpServers\.fs\.roots\[1\]: got .+, expected an absolute path$/);
    for (const bad of ['/srv/data', 5, { a: '/x' }]) {
      const { config, errors } = parse({ mcpServers: { fs: { command: 'x', roots: bad } } });
      assert.equal(config, null, JSON.stringify(bad));
      assert.equal(errors.length, 1, errors.join(' | '));
      assert.match(errors[0]!, new RegExp(`^config\\.json: mcpServers\\.fs\\.roots: got ${typeof bad === 'object' ? 'object' : typeof bad}, expected `));
    }
  });

  // Regression: a shared child gets only the client capabilities the operator enables.
  it('parseConfig() accepts "clientCapabilities" of sampling, elicitation and roots only ("roots" not with "roots" directories), naming server and field otherwise', () => {
    const ok = parse({ mcpServers: {
      a: { command: 'x', clientCapabilities: ['sampling', 'elicitation'] }, b: { command: 'y', clientCapabilities: ['elicitation'] },
      c: { command: 'z', clientCapabilities: ['roots'] },
    } });
    assert.deepEqual(ok.errors, []);
    assert.deepEqual([...(byName(ok.config!.servers, 'a') as Json).clientCapabilities], ['sampling', 'elicitation']);
    assert.deepEqual([...(byName(ok.config!.servers, 'b') as Json).clientCapabilities], ['elicitation']);
    assert.deepEqual([...(byName(ok.config!.servers, 'c') as Json).clientCapabilities], ['roots']);
    // Asking the clients for their roots and naming the server's own roots contradict each other.
    const both = parse({ mcpServers: { srv9: { command: 'x', clientCapabilities: ['roots'], roots: ['/srv/data'] } } });
    assert.equal(both.config, null);
    assert.equal(both.errors.length, 1, both.errors.join(' | '));
    assert.match(both.errors[0]!, /^config\.json: mcpServers\.srv9\.clientCapabilities: "roots"/, both.errors[0]);
    for (const bad of [['tools'], ['sampling', 'tools'], 'sampling', [5], { sampling: {} }]) {
      const { config, errors } = parse({ mcpServers: { srv9: { command: 'x', clientCapabilities: bad } } });
      assert.equal(config, null, JSON.stringify(bad));
      assert.equal(errors.length, 1, `${JSON.stringify(bad)}: ${errors.join(' | ')}`);
      assert.match(errors[0]!, /^config\.json: mcpServers\.srv9\.clientCapabilities/, errors[0]);
    }
  });

  // Regression: the answer-line limit is settable per server.
  // The ceiling is 256 MiB: V8 cannot decode a line of more than ~512 Mi characters into a string, and a child
  // writing a 600 MB line under a 1 GiB limit ended the process.
  it('parseConfig() accepts "maxLineBytes" from 1 to 256 MiB (at the ceiling) and rejects 0, negatives, fractions, strings and 256 MiB + 1', () => {
    const CEILING = 256 * 1024 * 1024;
    for (const n of [1, 64 * 1024 * 1024, CEILING]) {
      const { config, errors } = parse({ mcpServers: { big: { command: 'x', maxLineBytes: n } } });
      assert.deepEqual(errors, [], String(n));
      assert.equal((byName(config!.servers, 'big') as Json).maxLineBytes, n);
    }
    for (const bad of [0, -1, 1.5, '1024', CEILING + 1, 1024 * 1024 * 1024, null]) {
      const { config, errors } = parse({ mcpServers: { big: { command: 'x', maxLineBytes: bad } } });
      assert.equal(config, null, JSON.stringify(bad));
      assert.equal(errors.length, 1, `${JSON.stringify(bad)}: ${errors.join(' | ')}`);
      assert.match(errors[0]!, /^config\.json: mcpServers\.big\.maxLineBytes: got /, errors[0]);
    }
  });

  // Regression: a NUL in an argument made spawn() throw synchronously at every restart.
  it('parseConfig() rejects a NUL character in command, args, env and cwd, also one that came from ${VAR}, without quoting the value', () => {
    const cases: [Json, string][] = [
      [{ command: 'no\u0000de' }, 'command'],
      [{ command: 'x', args: ['ok', 'a\u0000b'] }, 'args[1]'],
      [{ command: 'x', env: { K: 'v\u0000v' } }, 'env.K'],
      [{ command: 'x', cwd: '/tmp/\u0000' }, 'cwd'],
      [{ command: 'x', args: ['${NUL_VALUE}'] }, 'args[0]'],
    ];
    for (const [entry, field] of cases) {
      const { config, errors } = parse({ mcpServers: { nul: entry } }, { NUL_VALUE: 'secret-part\u0000rest' });
      assert.equal(config, null, field);
      assert.equal(errors.length, 1, `${field}: ${errors.join(' | ')}`);
      assert.ok(errors[0]!.startsWith(`config.json: mcpServers.nul.${field}`), errors[0]);
      assert.match(errors[0]!, /contains a NUL character/);
      assert.ok(!errors[0]!.includes('secret-part') && !errors[0]!.includes('\u0000'), errors[0]);
    }
  });

  // Regression: a default written in the config is not a secret; values from the environment and files are.
  it('parseConfig() records as secrets the values that came from the environment and from files, not ${VAR:-default} defaults', () => {
    const secretPath = path.join(tmpDir('cfg'), 'k.txt');
    fs.writeFileSync(secretPath, 'from-a-file-1234\n');
    const { config, errors } = parse(
      { mcpServers: { s: { command: 'x', args: ['${SET_VAR}', '${UNSET_VAR:-default-in-config}', '${OTHER_SET:-unused-default}'], env: { F: `\${file:${secretPath}}` } } } },
      { SET_VAR: 'from-the-env-5678', OTHER_SET: 'also-from-env-90' },
    );
    assert.deepEqual(errors, []);
    assert.deepEqual([...byName(config!.servers, 's').secrets].sort(), ['also-from-env-90', 'from-a-file-1234', 'from-the-env-5678']);
  });

  // Regression: ${file:/dev/zero} made start-up read forever.
  it('parseConfig() reads a ${file:} secret of 65535 and 65536 bytes; 65537 bytes is an error "larger than 65536 bytes"', () => {
    const dir = tmpDir('cfg');
    for (const bytes of [65_535, 65_536]) {
      const file = path.join(dir, `s${bytes}`);
      fs.writeFileSync(file, 'k'.repeat(bytes));
      const { config, errors } = parse({ mcpServers: { s: { command: 'x', env: { K: `\${file:${file}}` } } } });
      assert.deepEqual(errors, [], String(bytes));
      assert.equal(config!.servers[0]!.env.K!.length, bytes);
    }
    const over = path.join(dir, 's65537');
    fs.writeFileSync(over, 'k'.repeat(65_537));
    const { config, errors } = parse({ mcpServers: { vault: { command: 'x', env: { K: `\${file:${over}}` } } } });
    assert.equal(config, null);
    assert.equal(errors.length, 1, errors.join(' | '));
    assert.ok(errors[0]!.startsWith('config.json: mcpServers.vault.env.K'), errors[0]);
    assert.match(errors[0]!, /larger than 65536 bytes/);
    assert.ok(!errors[0]!.includes('kkkk'), 'no content in the error');
  });

  it('loadConfigFile() reads a config file of exactly 1 MiB; 1 MiB + 1 byte is an error naming the path and the limit', () => {
    const MIB = 1024 * 1024;
    const dir = tmpDir('cfg');
    const json = JSON.stringify({ mcpServers: { m: { command: 'node' } } });
    const at = path.join(dir, 'at.json');
    fs.writeFileSync(at, json + ' '.repeat(MIB - json.length));
    assert.equal(fs.statSync(at).size, MIB);
    assert.deepEqual(loadConfigFile(at, {}).errors, []);
    const over = path.join(dir, 'over.json');
    fs.writeFileSync(over, json + ' '.repeat(MIB + 1 - json.length));
    const res = loadConfigFile(over, {});
    assert.equal(res.config, null);
    assert.equal(res.errors.length, 1);
    assert.ok(res.errors[0]!.startsWith(`${over}: `), res.errors[0]);
    assert.match(res.errors[0]!, /larger than 1048576 bytes/);
  });

  // F5. maxLineBytes up to 1 GiB was accepted, past the longest string V8 can make of it.
  it('F5 "maxLineBytes" above 256 MiB is a config error: 268435456 is accepted, 268435457 → "expected an integer from 1 to 268435456"', () => {
    const parse = (n: number) => parseConfig(JSON.stringify({ mcpServers: { big: { command: 'x', maxLineBytes: n } } }), 'config.json', {});
    const at = parse(256 * MIB);
    assert.deepEqual(at.errors, []);
    assert.equal((at.config!.servers[0] as Json).maxLineBytes, 256 * MIB);
    for (const n of [256 * MIB + 1, 1024 * MIB]) {
      const over = parse(n);
      assert.equal(over.config, null, String(n));
      assert.deepEqual(over.errors, ['config.json: mcpServers.big.maxLineBytes: got number, expected an integer from 1 to 268435456']);
    }
  });
});

// ── 5. Children: spawn, framing, restart, kill ──────────────────────────────────────────────────────────

describe('5. Children: spawn, framing, restart, kill', () => {
  function framer(max: number) {
    const lines: string[] = [];
    const oversize: { bytes: number; head: string }[] = [];
    const f = createLineFramer(max, (l) => lines.push(l), (bytes, head) => oversize.push({ bytes, head }));
    return { f, lines, oversize };
  }

  it('createLineFramer() splits on \\n, strips a trailing \\r and skips empty lines', () => {
    const { f, lines, oversize } = framer(1024);
    f.push(Buffer.from('{"a":1}\n{"b":2}\r\n\n\r\n  {"c":3}\n'));
    assert.deepEqual(lines, ['{"a":1}', '{"b":2}', '  {"c":3}']);
    assert.deepEqual(oversize, []);
  });

  it('createLineFramer() joins lines split across chunks, including inside a UTF-8 character', () => {
    const { f, lines } = framer(1024);
    const bytes = Buffer.from('{"t":"héllo wörld €"}\r\n{"u":2}\n');
    for (let i = 0; i < bytes.length; i++) f.push(bytes.subarray(i, i + 1)); // one byte at a time
    assert.deepEqual(lines, ['{"t":"héllo wörld €"}', '{"u":2}']);
    const { f: g, lines: l2 } = framer(1024);
    g.push(Buffer.from('{"a"'));
    g.push(Buffer.from(':1}\r'));
    assert.deepEqual(l2, [], 'no line before its newline');
    g.push(Buffer.from('\n'));
    assert.deepEqual(l2, ['{"a":1}'], '\\r split from its \\n is still stripped');
  });

  it('createLineFramer() accepts a line of maxLineBytes - 1 and exactly maxLineBytes bytes', () => {
    const { f, lines, oversize } = framer(10);
    f.push(Buffer.from('123456789\n1234567890\n'));
    assert.deepEqual(lines, ['123456789', '1234567890']);
    assert.deepEqual(oversize, []);
    const { f: g, lines: l2, oversize: o2 } = framer(10);
    g.push(Buffer.from('ééééé\n')); // 5 characters, 10 bytes
    assert.deepEqual(l2, ['ééééé']);
    assert.deepEqual(o2, []);
  });

  it('createLineFramer() drops a line of maxLineBytes + 1 bytes, reports it once, and keeps framing', () => {
    const { f, lines, oversize } = framer(10);
    f.push(Buffer.from('12345678901\nnext\n'));
    assert.deepEqual(lines, ['next']);
    assert.equal(oversize.length, 1);
    assert.ok(oversize[0]!.bytes > 10, `bytes ${oversize[0]!.bytes}`);
    assert.ok('12345678901'.startsWith(oversize[0]!.head), `head ${JSON.stringify(oversize[0]!.head)} is a prefix`);
    const { f: g, lines: l2, oversize: o2 } = framer(10);
    g.push(Buffer.from('éééééé\nok\n')); // 6 characters, 12 bytes: limit counts bytes, not characters
    assert.deepEqual(l2, ['ok']);
    assert.equal(o2.length, 1);
  });

  it('createLineFramer() drops an oversized line that arrives in many chunks and leaves no residue', () => {
    const { f, lines, oversize } = framer(100);
    f.push(Buffer.from('{"ok":0}\n'));
    for (let i = 0; i < 50; i++) f.push(Buffer.from('z'.repeat(64))); // 3200 bytes with no newline
    f.push(Buffer.from('zzz\n{"ok":1}\n'));
    f.push(Buffer.from('{"ok":2}\n'));
    assert.deepEqual(lines, ['{"ok":0}', '{"ok":1}', '{"ok":2}']);
    assert.equal(oversize.length, 1, 'one report per oversized line');
    assert.ok(oversize[0]!.bytes > 100);
    assert.ok(oversize[0]!.head.length <= 3203 && /^z*$/.test(oversize[0]!.head));
  });

  it('createLineFramer() handles two oversized lines in a row and then a good one', () => {
    const { f, lines, oversize } = framer(4);
    f.push(Buffer.from('aaaaa\nbbbbbbbbbb\ncccc\n'));
    assert.deepEqual(lines, ['cccc']);
    assert.equal(oversize.length, 2);
  });

  it('nextRestart() follows the restart table (doubling, cap, reset after a stable run, give up)', () => {
    const limits: Limits = { ...DEFAULT_LIMITS, restartMinDelayMs: 1000, restartMaxDelayMs: 30_000, stableUptimeMs: 10_000, maxUnstableRestarts: 5 };
    const table: [number, number, ReturnType<typeof nextRestart>][] = [
      // [unstableRestarts so far, uptimeMs] → decision
      [0, 0, { giveUp: false, delayMs: 1000, unstableRestarts: 1 }],
      [0, 9_999, { giveUp: false, delayMs: 1000, unstableRestarts: 1 }], // just under stable
      [0, 10_000, { giveUp: false, delayMs: 1000, unstableRestarts: 0 }], // exactly stable → reset
      [4, 10_000, { giveUp: false, delayMs: 1000, unstableRestarts: 0 }], // stable run resets the counter
      [4, 60_000, { giveUp: false, delayMs: 1000, unstableRestarts: 0 }],
      [1, 500, { giveUp: false, delayMs: 2000, unstableRestarts: 2 }],
      [2, 500, { giveUp: false, delayMs: 4000, unstableRestarts: 3 }],
      [3, 500, { giveUp: false, delayMs: 8000, unstableRestarts: 4 }],
      [4, 500, { giveUp: false, delayMs: 16_000, unstableRestarts: 5 }], // at maxUnstableRestarts: still restarts
      [5, 500, { giveUp: true, unstableRestarts: 6 }], // one over → give up
    ];
    for (const [n, uptime, expected] of table) assert.deepEqual(nextRestart(n, uptime, limits), expected, `nextRestart(${n}, ${uptime})`);
  });

  it('nextRestart() caps the delay at restartMaxDelayMs (under/at/over the cap)', () => {
    const limits: Limits = { ...DEFAULT_LIMITS, restartMinDelayMs: 1000, restartMaxDelayMs: 16_000, stableUptimeMs: 10_000, maxUnstableRestarts: 50 };
    assert.deepEqual(nextRestart(3, 0, limits), { giveUp: false, delayMs: 8000, unstableRestarts: 4 });
    assert.deepEqual(nextRestart(4, 0, limits), { giveUp: false, delayMs: 16_000, unstableRestarts: 5 });
    assert.deepEqual(nextRestart(5, 0, limits), { giveUp: false, delayMs: 16_000, unstableRestarts: 6 });
    assert.deepEqual(nextRestart(40, 0, limits), { giveUp: false, delayMs: 16_000, unstableRestarts: 41 });
  });

  it('nextRestart() uses DEFAULT_LIMITS when no limits are given', () => {
    assert.deepEqual(nextRestart(0, 0), { giveUp: false, delayMs: DEFAULT_LIMITS.restartMinDelayMs, unstableRestarts: 1 });
    assert.deepEqual(nextRestart(DEFAULT_LIMITS.maxUnstableRestarts, 0), { giveUp: true, unstableRestarts: DEFAULT_LIMITS.maxUnstableRestarts + 1 });
    assert.equal(nextRestart(3, DEFAULT_LIMITS.stableUptimeMs).unstableRestarts, 0);
  });

  it('a child that prints garbage lines on stdout is contained and keeps answering', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const client = await h.client('fix', 'mcp');
    const pid = h.proxy.status().fix!.pid;
    const r = await client.callTool({ name: 'do', arguments: { what: 'garbage' } });
    assert.equal(textOf(r), 'after garbage');
    const again = await client.callTool({ name: 'do', arguments: { what: 'echo', text: 'still here' } });
    assert.equal(textOf(again), 'still here');
    assert.equal(h.proxy.status().fix!.pid, pid, 'garbage does not restart the child');
    assert.equal(h.proxy.status().fix!.restarts, 0);
  });

  it('a bare CR in a child\'s JSON (whitespace to JSON, a line end to SSE) does not cut an SSE event short', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const sse = await h.client('fix', 'sse');
    // 0: spliced as text; 20,000: over RAW_PASSTHROUGH_MIN_BYTES, spliced as the child's own bytes.
    for (const pad of [0, 20_000]) {
      const r = await within(sse.callTool({ name: 'do', arguments: { what: 'cr', pad } }), 10_000, `cr call, pad ${pad}`);
      assert.equal(textOf(r), 'cr ok' + 'z'.repeat(pad));
    }
    // Streamable HTTP streams the answer as an event too when the client asks for progress.
    const mcp = await h.client('fix', 'mcp');
    const r = await mcp.callTool({ name: 'do', arguments: { what: 'cr', pad: 20_000 } }, undefined, { onprogress: () => {} });
    assert.equal(textOf(r), 'cr ok' + 'z'.repeat(20_000));
    assert.equal(textOf(await sse.callTool({ name: 'do', arguments: { what: 'echo', text: 'after' } })), 'after');
  });

  // Regression: the client used to wait for requestTimeoutMs (10 minutes by default).
  it('a child line of maxLineBytes is delivered; one byte over: its request gets MESSAGE_TOO_LARGE (-32006) at once, naming the limit; the child keeps working', { timeout: 30_000 }, async (t) => {
    const max = 4096;
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, maxLineBytes: max, requestTimeoutMs: 120_000 } });
    await h.proxy.ready(10_000);
    const sid = await rawSession(h.url, 'fix');
    const mcp = `${h.url}/fix/mcp`;
    for (const bytes of [max - 1, max]) {
      const res = await post(mcp, call(10 + bytes, { what: 'line', bytes }), sessionHeaders(sid));
      assert.equal(res.status, 200, res.text);
      const msg = onlyMessage(res);
      assert.equal(msg.id, 10 + bytes);
      assert.match(textOf(msg.result), /^x+$/);
      assert.ok(textOf(msg.result).length > bytes - 200, `${bytes}-byte line delivered whole`);
    }
    const over = await within(post(mcp, call(99, { what: 'line', bytes: max + 1 }), sessionHeaders(sid)), 5_000, 'over-limit call (requestTimeoutMs is 120 s)');
    const overMsg = onlyMessage(over);
    assert.equal(overMsg.id, 99);
    assert.equal(overMsg.error?.code, -32006, over.text);
    assert.match(overMsg.error.message, /\b4096\b/, 'names the limit in bytes');
    assert.match(overMsg.error.message, /maxLineBytes/);
    const after = onlyMessage(await post(mcp, call(100, { what: 'echo', text: 'next' }), sessionHeaders(sid)));
    assert.equal(textOf(after.result), 'next');
    assert.equal(h.proxy.status().fix!.restarts, 0, 'an oversized line does not restart the child');
  });

  it('an oversized answer is matched to its request by its top-level "id" as JSON.parse reads it (past nested, look-alike and repeated "id" keys naming another pending request)', { timeout: 30_000 }, async (t) => {
    const log = path.join(tmpDir('bigid'), 'fixture.log');
    const h = await harness(t, { servers: [fixture('fix', 'ok', { env: { FIXTURE_LOG: log } })] }, { limits: { ...FAST, maxLineBytes: 4096, requestTimeoutMs: 120_000 } });
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const a = await rawSession(h.url, 'fix');
    const b = await rawSession(h.url, 'fix');
    const waitingA = post(mcp, call('a-hang', { what: 'hang' }), sessionHeaders(a));
    const childIdOfA = await waitFor(() => fileLines(log).find((l) => l.startsWith('hang '))?.slice(5), 5_000, "a's request at the child");
    // Decoys: nested "id" keys, a key "i\nd", a repeated top-level "id" (JSON.parse takes the last), and the
    // real id under the escaped key "\u0069\u0064", all naming a's request.
    for (const keys of ['plain', 'escaped', 'repeated']) {
      const res = await within(post(mcp, call(`b-${keys}`, { what: 'bigid', bytes: 8000, decoy: JSON.parse(childIdOfA), keys }), sessionHeaders(b)), 5_000, `the oversized answer (${keys})`);
      const msg = onlyMessage(res);
      assert.equal(msg.id, `b-${keys}`);
      assert.equal(msg.error?.code, -32006, res.text);
    }
    // a's request is still pending: ending its session answers it with SESSION_ENDED, not the oversize error.
    assert.equal((await request(mcp, { method: 'DELETE', headers: { 'mcp-session-id': a } })).status, 200);
    const answerA = onlyMessage(await within(waitingA, 5_000, "a's request"));
    assert.deepEqual(answerA.error, { code: -32004, message: 'Session ended' });
  });

  it('"maxLineBytes" per server: server-filesystem answering with a file (text + structuredContent) over its own limit gets -32006 at once; a server with a larger limit reads it', { timeout: 60_000 }, async (t) => {
    const dir = fs.realpathSync(tmpDir('bigfile'));
    const file = path.join(dir, 'big.txt');
    fs.writeFileSync(file, 'a'.repeat(700_000)); // the answer carries it twice: ~1.4 MB
    const h = await harness(t, {
      servers: [srv('small', [FILESYSTEM, dir], { maxLineBytes: 1024 * 1024 }), srv('large', [FILESYSTEM, dir], { maxLineBytes: 4 * 1024 * 1024 })],
    }, { limits: { ...FAST, requestTimeoutMs: 120_000 } });
    await h.proxy.ready(20_000);
    const small = await h.client('small', 'mcp');
    const outcome = await within(small.callTool({ name: 'read_text_file', arguments: { path: file } }).then(() => 'answered', (e: unknown) => e), 10_000, 'the oversized answer');
    assert.notEqual(outcome, 'answered', 'a 1.4 MB answer is over the server\'s 1 MiB maxLineBytes');
    isMcpError(-32006, /1048576.*maxLineBytes|maxLineBytes.*1048576/)(outcome);
    const large = await h.client('large', 'mcp');
    const r = await within(large.callTool({ name: 'read_text_file', arguments: { path: file } }), 10_000, 'the same file under a 4 MiB limit');
    assert.equal(textOf(r).length, 700_000);
  });

  it('a child writing huge stderr lines keeps answering (stderr is log, not protocol)', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, maxStderrLineBytes: 64 } });
    await h.proxy.ready(10_000);
    const client = await h.client('fix', 'mcp');
    for (const bytes of [63, 64, 65, 1_000_000]) {
      const r = await client.callTool({ name: 'do', arguments: { what: 'stderr', bytes } });
      assert.equal(textOf(r), 'after stderr', `stderr line of ${bytes} bytes`);
    }
    assert.equal(h.proxy.status().fix!.restarts, 0);
  });

  // Verified red on a copy of proxy.ts with the masking of cut stderr heads reverted: without maskSecrets() in onInitializeAnswer the
  // secret is in the "initialize failed" line; with the stderr head taken at 80 bytes the cut line is 80 bytes;
  // with the head cut at the limit but no secret-length slack, the secret's first bytes ("sk-liv") are logged.
  it('secrets are masked in a failed initialize log line and in a stderr line cut at maxStderrLineBytes (secret across the cut)', { timeout: 20_000 }, async (t) => {
    const secret = 'sk-live-0123456789abcdef';
    const max = 256;
    const lines: string[] = [];
    const withSecret = { env: { API_KEY: secret }, secrets: [secret] };
    const h = await harness(t, { servers: [fixture('badinit', 'initerror', withSecret), fixture('talky', 'ok', withSecret)] }, {
      log: captureLog(lines),
      limits: { ...FAST, maxStderrLineBytes: max, maxUnstableRestarts: 1 },
    });
    const failed = await waitFor(() => lines.find((l) => l.startsWith('error [badinit] initialize failed')), 10_000, 'the initialize failure logged');
    assert.ok(!failed.includes(secret), `secret in: ${failed}`);
    assert.match(failed, /bad api key \*\*\*/, 'the secret is masked where it was');
    await waitFor(() => h.proxy.status().talky!.state === 'ready', 10_000, 'talky ready');
    const client = await h.client('talky', 'mcp');
    const stderrLine = (text: string) => `info [talky] stderr: ${text}`;
    // Under and at the limit a line is logged whole; over it, cut to the limit (not to 80 bytes).
    for (const bytes of [max - 1, max]) {
      await client.callTool({ name: 'do', arguments: { what: 'stderr', bytes } });
      await waitFor(() => lines.includes(stderrLine('e'.repeat(bytes))), 5_000, `the ${bytes}-byte stderr line logged whole`);
    }
    await client.callTool({ name: 'do', arguments: { what: 'stderr', bytes: max + 1 } });
    const over = await waitFor(() => lines.find((l) => l.startsWith(stderrLine('e')) && l.includes('truncated')), 5_000, 'the over-limit line');
    assert.equal(over, stderrLine(`${'e'.repeat(max)}… (${max + 1} bytes, truncated)`));
    // The secret starts 6 bytes before the cut and ends after it.
    const pad = max - 6;
    const tail = 1000;
    await client.callTool({ name: 'do', arguments: { what: 'stderr-var', name: 'API_KEY', pad, tail } });
    const cut = await waitFor(() => lines.find((l) => l.startsWith(stderrLine('x'))), 5_000, 'the stderr line with the secret');
    const bytes = pad + secret.length + tail;
    assert.equal(cut, stderrLine(`${`${'x'.repeat(pad)}***${'y'.repeat(tail)}`.slice(0, max)}… (${bytes} bytes, truncated)`));
    for (const line of lines) assert.ok(!line.includes(secret.slice(0, 4)), `part of the secret in: ${line.slice(0, 400)}`);
  });

  it('each child leads its own process group (kill(-pid) reaches it)', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const pid = h.proxy.status().fix!.pid;
    assert.ok(pid);
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const pgrp = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[2]);
    assert.equal(pgrp, pid, 'child pid is its process group id');
    assert.notEqual(pgrp, process.pid);
  });

  it('a child gets an allow-listed environment plus its configured env, and its configured cwd', { timeout: 20_000 }, async (t) => {
    const secretName = `RMP_PARENT_SECRET_${process.pid}`;
    process.env[secretName] = 'parent-only-value';
    t.after(() => {
      delete process.env[secretName];
    });
    const cwd = fs.realpathSync(tmpDir('cwd'));
    const h = await harness(t, { servers: [fixture('fix', 'ok', { env: { CONFIGURED: 'yes' }, cwd })] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const client = await h.client('fix', 'mcp');
    const env = JSON.parse(textOf(await client.callTool({ name: 'do', arguments: { what: 'env' } })));
    assert.equal(env.CONFIGURED, 'yes');
    assert.equal(typeof env.PATH, 'string', 'PATH is inherited');
    assert.equal(env[secretName], undefined, 'the proxy environment is not inherited wholesale (STYLE P7)');
    assert.equal(textOf(await client.callTool({ name: 'do', arguments: { what: 'cwd' } })), cwd);
  });

  it('startConcurrency: at most that many children initialize at once', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('s1', 'noinit'), fixture('s2', 'noinit'), fixture('s3')] }, {
      limits: { ...FAST, startConcurrency: 2, initTimeoutMs: 60_000 },
    });
    await waitFor(() => h.proxy.status().s1!.pid !== null && h.proxy.status().s2!.pid !== null, 5_000, 'two children spawned (at the limit)');
    // Both slots are held by children that never answer initialize, so the third (over) must wait.
    await request(`${h.url}/healthz`);
    const s3 = h.proxy.status().s3!;
    assert.equal(s3.pid, null, 'third child not spawned while both start slots are busy');
    assert.equal(s3.state, 'starting');
  });

  // Verified red on a copy of proxy.ts without onInitializeAnswer's `if (up.state === 'stopped') return`: the late
  // answer marks the stopped child ready, its exit is then taken for a crash ("restarting in 1 ms") and the
  // restarted child belongs to nothing, so close() leaves it running.
  it('per-session mode: a session ending while its child is still starting stops the child for good; close() leaves nothing', { timeout: 20_000 }, async (t) => {
    const dir = tmpDir('slowinit');
    const pidFile = path.join(dir, 'pids');
    const fixtureLog = path.join(dir, 'fixture.log');
    const lines: string[] = [];
    const h = await startHarness(
      { servers: [fixture('solo', 'slowinit', { sessions: 'per-session', env: { FIXTURE_PIDFILE: pidFile, FIXTURE_LOG: fixtureLog, FIXTURE_INIT_DELAY_MS: '300' } })] },
      // A grace longer than the answer delay: the child answers initialize after its stdin closed, then exits.
      { log: captureLog(lines), limits: { ...FAST, killGraceMs: 3_000, restartMinDelayMs: 1, restartMaxDelayMs: 1 } },
    );
    t.after(() => {
      for (const line of fileLines(pidFile)) h.groups.add(Number(line));
      return h.stop();
    });
    const stream = await openSse(`${h.url}/solo/sse`);
    const ep = await stream.next((e) => e.event === 'endpoint', 5_000, 'endpoint');
    // A per-session child starts at its session's initialize.
    assert.equal((await post(`${h.url}${ep.data}`, initMsg(1, '2024-11-05'))).status, 202);
    await waitFor(() => fileLines(fixtureLog).some((l) => l.startsWith('initialize')), 5_000, 'the child received initialize');
    const [pid] = fileLines(pidFile).map(Number);
    assert.ok(pid);
    stream.close(); // the session ends before its child has answered initialize
    await waitFor(() => h.proxy.status().solo!.sessions === 0, 5_000, 'session ended');
    // Gone from /proc means reaped by this process, so the proxy's 'exit' handler for it has run.
    await waitFor(() => !fs.existsSync(`/proc/${pid}`), GONE_BOUND_MS, 'the child answered, exited and was reaped');
    assert.deepEqual(lines.filter((l) => /restarting|ready \(pid/.test(l)), [], 'the stopped child was neither made ready nor restarted');
    await h.proxy.close();
    assert.deepEqual(fileLines(pidFile).map(Number), [pid], 'no child started after the session ended');
    await assertAllGone([pid]);
  });

  // Regression: a synchronous spawn failure restarted every second forever, was never marked errored and was
  // reported as "exit 127".
  const SPAWN_FAIL_LIMITS: Partial<Limits> = { ...FAST, restartMinDelayMs: 20, restartMaxDelayMs: 40, maxUnstableRestarts: 2 };
  async function spawnFailure(t: TestContext, server: ServerConfig, code: string, exitReported = false) {
    const lines: string[] = [];
    const h = await harness(t, { servers: [server, fixture('fine')] }, { log: captureLog(lines), limits: SPAWN_FAIL_LIMITS });
    const name = server.name;
    await waitFor(() => h.proxy.status()[name]!.state === 'errored', 10_000, `${name} errored`);
    assert.equal(h.proxy.status()[name]!.restarts, 2, 'through backoff: maxUnstableRestarts restarts, then errored');
    const starts = lines.filter((l) => l.includes(`[${name}]`) && l.includes('cannot start'));
    assert.ok(starts.length >= 1, lines.join('\n'));
    for (const line of starts) assert.match(line, new RegExp(`^(error|warn) \\[${name}\\] cannot start ${JSON.stringify(server.command).replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}: ${code}$`));
    // Only a missing command may also be told in shell terms (127, STYLE P7); the others never ran at all.
    if (!exitReported) assert.deepEqual(lines.filter((l) => l.includes(`[${name}]`) && /exit 12[67]/.test(l)), [], 'not reported as an exit');
    assertRpcError(await post(`${h.url}/${name}/mcp`, initMsg(), { accept: 'application/json' }), 503, -32000);
    await waitFor(() => h.proxy.status().fine!.state === 'ready', 10_000, 'fine ready');
    const client = await h.client('fine', 'mcp');
    assert.equal(textOf(await client.callTool({ name: 'do', arguments: { what: 'echo', text: 'up' } })), 'up');
    return lines;
  }

  it('spawnChild(): a synchronous spawn failure (a NUL in an argument) goes through backoff to errored, logged as cannot start "COMMAND": CODE', { timeout: 20_000 }, async (t) => {
    const lines = await spawnFailure(t, srv('nularg', ['-e', '0', 'x\u0000y']), 'ERR_INVALID_ARG_VALUE');
    assert.ok(!lines.some((l) => l.includes('x\u0000y') || l.includes('x\\x00y')), 'the argument is not logged');
  });

  it('spawnChild(): a cwd that is a file (ENOTDIR, thrown by spawn) goes through backoff to errored', { timeout: 20_000 }, async (t) => {
    const file = path.join(tmpDir('cwdfile'), 'not-a-dir');
    fs.writeFileSync(file, '');
    await spawnFailure(t, srv('cwdfile', ['-e', '0'], { cwd: file }), 'ENOTDIR');
  });

  it('spawnChild(): a command that does not exist (ENOENT, an error event) goes through backoff to errored', { timeout: 20_000 }, async (t) => {
    await spawnFailure(t, srv('ghost', [], { command: '/nonexistent/definitely-not-here' }), 'ENOENT', true);
  });

  // EMFILE cannot be provoked without starving the test process of descriptors, so spawn is replaced for one
  // server by what Node's own spawn() does on EMFILE (lib/internal/child_process.js): it returns a ChildProcess
  // with no pid and no stdio, and emits 'error' on the next tick. Before the fix attachChildStreams() threw
  // on the missing stdout and took startProxy() down.
  it('spawnChild(): EMFILE (a ChildProcess without stdio, then an error event) goes through backoff to errored', { timeout: 20_000 }, async (t) => {
    const real = childProcess.spawn;
    const fake = function spawnWithEmfile(this: unknown, ...args: Parameters<typeof childProcess.spawn>) {
      if (Array.isArray(args[1]) && args[1].includes('emfile-marker')) {
        const proc = new childProcess.ChildProcess();
        process.nextTick(() => proc.emit('error', Object.assign(new Error('spawn EMFILE'), { code: 'EMFILE', errno: -24, syscall: 'spawn' })));
        return proc;
      }
      return real.apply(this, args as never);
    };
    (childProcess as { spawn: unknown }).spawn = fake;
    syncBuiltinESMExports();
    t.after(() => {
      (childProcess as { spawn: unknown }).spawn = real;
      syncBuiltinESMExports();
    });
    await spawnFailure(t, srv('emfile', ['-e', '0', 'emfile-marker']), 'EMFILE');
  });

  // Regression: Node's message for a spawn failure quotes the offending value, here an env value.
  it('spawnChild(): a spawn failure is logged with the error code and command only, never Node\'s message (which quotes env values)', { timeout: 20_000 }, async (t) => {
    const lines = await spawnFailure(t, srv('envnul', ['-e', '0'], { env: { API_KEY: 'sk-live-NOT-MASKED-4242\u0000tail' }, secrets: [] }), 'ERR_INVALID_ARG_VALUE');
    for (const line of lines) assert.ok(!line.includes('NOT-MASKED-4242') && !line.includes('options.env'), `env value or Node's message in: ${line}`);
  });

  // Regression: its server stayed "ready" while every request hung.
  it('a child that closes stdout but stays alive is treated as ended: its call gets -32005 at once, its group is stopped, it restarts (warn "closed its stdout")', { timeout: 30_000 }, async (t) => {
    const lines: string[] = [];
    const h = await harness(t, { servers: [fixture('fix')] }, { log: captureLog(lines), limits: { ...FAST, requestTimeoutMs: 120_000 } });
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const sid = await rawSession(h.url, 'fix');
    const pid1 = h.proxy.status().fix!.pid!;
    const res = await within(post(mcp, call('closing', { what: 'closeout' }), sessionHeaders(sid)), 5_000, 'the call whose child closed its stdout');
    const msg = onlyMessage(res);
    assert.equal(msg.id, 'closing');
    assert.equal(msg.error?.code, -32005, res.text);
    assert.equal(msg.error.message, 'MCP server closed its output');
    await waitFor(() => liveGroupMembers(pid1).length === 0, GONE_BOUND_MS, 'the old group stopped');
    await waitFor(() => h.proxy.status().fix!.state === 'ready' && h.proxy.status().fix!.pid !== pid1, 10_000, 'restarted');
    assert.equal(h.proxy.status().fix!.restarts, 1);
    assert.equal(textOf(onlyMessage(await post(mcp, call('after', { what: 'echo', text: 'again' }), sessionHeaders(sid))).result), 'again');
    assert.ok(lines.some((l) => /^warn \[fix\] .*closed its stdout/.test(l)), lines.join('\n'));
  });

  // Regression: JSON.stringify threw on a deep line and the proxy exited.
  it('a child answer nested deeper than maxJsonDepth is skipped and logged ("nested"); its request gets -32603 at once; under and at the limit it is delivered', { timeout: 30_000 }, async (t) => {
    const lines: string[] = [];
    // The answer line is {…,"result":{…,"deep":[[…]]}}: depth 2 + the arrays.
    const h = await harness(t, { servers: [fixture('fix')] }, { log: captureLog(lines), limits: { ...FAST, maxJsonDepth: 32, requestTimeoutMs: 120_000 } });
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const sid = await rawSession(h.url, 'fix');
    const pid = h.proxy.status().fix!.pid;
    for (const arrays of [29, 30]) {
      const msg = onlyMessage(await within(post(mcp, call(`d${arrays}`, { what: 'deep', depth: arrays }), sessionHeaders(sid)), 5_000, `depth ${arrays + 2}`));
      assert.equal(msg.id, `d${arrays}`);
      assert.equal(JSON.stringify(msg.result.deep), nestedArrays(arrays), `depth ${arrays + 2} delivered`);
    }
    for (const arrays of [31, 10_000]) {
      const res = await within(post(mcp, call(`d${arrays}`, { what: 'deep', depth: arrays }), sessionHeaders(sid)), 5_000, `depth ${arrays + 2}`);
      const msg = onlyMessage(res);
      assert.equal(msg.id, `d${arrays}`);
      assert.equal(msg.error?.code, -32603, res.text);
    }
    assert.ok(lines.filter((l) => /^warn \[fix\] .*nested/.test(l)).length >= 2, lines.join('\n'));
    // A deep notification is skipped the same way; the call that follows it is answered.
    const note = onlyMessage(await within(post(mcp, call('dn', { what: 'deepnote', depth: 10_000 }), sessionHeaders(sid)), 5_000, 'deep notification'));
    assert.equal(textOf(note.result), 'after deep');
    assert.equal(h.proxy.status().fix!.pid, pid);
    assert.equal(h.proxy.status().fix!.restarts, 0);
  });

  // Regression: an error boundary around every child line.
  it('an unexpected throw while handling one child line drops that line only: the next line of the same chunk is answered', { timeout: 30_000 }, async (t) => {
    const lines: string[] = [];
    const faulty = faultyLog(lines);
    const h = await harness(t, { servers: [fixture('fix')] }, { log: faulty.log, limits: { ...FAST, requestTimeoutMs: 120_000 } });
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const sid = await rawSession(h.url, 'fix');
    // The report of the bad line ("not json") throws; the answer written in the same chunk must still arrive.
    faulty.arm((level, scope, text) => scope === 'fix' && level === 'warn' && /stdout/.test(text));
    const res = await within(post(mcp, call('g1', { what: 'garbage1' }), sessionHeaders(sid)), 5_000, 'the answer after the bad line');
    assert.ok(faulty.fired(), `the bad line was reported (log: ${lines.join(' | ')})`);
    assert.equal(textOf(onlyMessage(res).result), 'after garbage');
    assert.equal(textOf(onlyMessage(await post(mcp, call('g2', { what: 'echo', text: 'still' }), sessionHeaders(sid))).result), 'still');
    assert.equal(h.proxy.status().fix!.restarts, 0);
  });

  it('the leak check itself notices a live process group (self-test of assertAllGone)', { timeout: 15_000 }, async () => {
    const child = spawn(NODE, ['-e', 'setInterval(()=>{},1e6)'], { detached: true, stdio: 'ignore' });
    const pid = child.pid!;
    assert.deepEqual(liveGroupMembers(pid), [pid]);
    await assert.rejects(assertAllGone([pid], [], 300), /leaked processes/);
    // assertAllGone SIGKILLed the survivor on its way out, so the group is now gone.
    await assertAllGone([pid]);
  });

  // F9. The id scanner did not tell answers from requests: a child's own bad request failed our request of that number.
  it('F9 a child\'s own request nested too deep, or over maxLineBytes, under the number of our request in flight is skipped (warn "skipped a stdout line") and our request still gets its answer', { timeout: 20_000 }, async (t) => {
    const lines: string[] = [];
    const f = reviewFiles('f9');
    const h = await reviewHarness(t, { servers: [reviewFixture('fix', 'ok', { FIXTURE_PIDFILE: f.pidFile, FIXTURE_LOG: f.log }, { maxLineBytes: 4096 })] },
      { log: captureLog(lines), limits: FAST }, f.pidFile);
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const a = await reviewSession(h.url, 'fix');
    const b = await reviewSession(h.url, 'fix');
    const hangs = () => fileLines(f.log).filter((l) => l.startsWith('hang ')).map((l) => Number(l.slice(5)));
    const cases = [
      { args: { what: 'deepreq', depth: 200 }, log: /^warn \[fix\] skipped a stdout line \(nested deeper than 128 levels, \d+ bytes\) starting "\{\\"jsonrpc\\":\\"2\.0\\",\\"id\\":(\d+),\\"method\\":\\"elicitation\/create\\"/ },
      { args: { what: 'bigreq', bytes: 8 * KIB }, log: /^warn \[fix\] skipped a stdout line of \d+ bytes over the 4096-byte limit \(maxLineBytes\), starting "\{\\"jsonrpc\\":\\"2\.0\\",\\"id\\":(\d+),\\"method\\":\\"elicitation\/create\\"/ },
    ];
    for (const [i, c] of cases.entries()) {
      let settled = false;
      const aCall = post(mcp, call(`a${i}`, { what: 'hang' }), reviewHeaders(a)).finally(() => (settled = true));
      await waitFor(() => hangs().length === i + 1, 5_000, 'A\'s request running');
      const childId = hangs()[i]!;
      const from = lines.length;
      assert.equal(answerText(await post(mcp, call(`b${i}`, { ...c.args, id: childId }), reviewHeaders(b))), 'sent');
      const skipped = lines.slice(from).filter((l) => l.startsWith('warn [fix]'));
      assert.equal(skipped.length, 1, skipped.join('\n'));
      assert.match(skipped[0]!, c.log);
      assert.equal(Number(c.log.exec(skipped[0]!)![1]), childId, 'the skipped line named A\'s number');
      assert.equal(answerText(await post(mcp, call(`r${i}`, { what: 'release' }), reviewHeaders(b))), 'released');
      const res = await within(aCall, 5_000, 'A\'s answer');
      assert.ok(settled);
      assert.deepEqual(JSON.parse(res.text), { jsonrpc: '2.0', id: `a${i}`, result: { content: [{ type: 'text', text: 'late' }] } });
    }
  });

  // F10. Masking missed \uXXXX, \/ and URL-encoded forms of a secret; escaping missed bidi and line-separator marks.
  it('F10 a child\'s stderr (logged at debug level and up) masks a secret written \\u00f6-escaped (either case), with \\/ and URL-encoded (%20 and +), and escapes U+202E, U+2028, U+2029, U+200F and U+2066 as \\uNNNN', { timeout: 20_000 }, async (t) => {
    const lines: string[] = [];
    const f = reviewFiles('f10');
    const secret = 'pa"ss\\wörd Zz9/x';
    const parsed = parseConfig(JSON.stringify({ mcpServers: { fix: { command: NODE, args: ['-e', REVIEW_FIXTURE, 'ok'], env: { Q: '${QSECRET}', FIXTURE_PIDFILE: f.pidFile } } } }), 'config.json', { QSECRET: secret });
    assert.deepEqual(parsed.errors, []);
    const h = await reviewHarness(t, parsed.config!, { log: captureLog(lines), logLevel: 'debug', limits: FAST }, f.pidFile);
    await h.proxy.ready(10_000);
    const sid = await reviewSession(h.url, 'fix');
    assert.equal(answerText(await post(`${h.url}/fix/mcp`, call(1, { what: 'sayenc' }), reviewHeaders(sid))), 'said');
    await waitFor(() => lines.some((l) => l.includes('bidi')), 5_000, 'the stderr lines logged');
    const stderr = lines.filter((l) => l.startsWith('info [fix] stderr: '));
    assert.deepEqual(stderr, [
      ...[0, 1, 2, 3, 4, 5].map((i) => `info [fix] stderr: form-${i}: ***`),
      'info [fix] stderr: bidi \\u202e evil \\u2028 ls \\u2029 ps \\u200f rlm \\u2066 iso end',
    ]);
    assert.ok(!lines.some((l) => l.includes('Zz9')), 'a piece of the secret in the log');
    assert.ok(!lines.some((l) => /[\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/.test(l)), 'a raw bidi or separator mark in the log');
  });
});

// ── 6. Sessions and id routing ──────────────────────────────────────────────────────────────────────────

describe('6. Sessions and id routing', () => {
  it('SUPPORTED_PROTOCOL_VERSIONS lists the four dated versions, newest first', () => {
    assert.deepEqual([...SUPPORTED_PROTOCOL_VERSIONS], ['2025-11-25', '2025-06-18', '2025-03-26', '2024-11-05']);
  });

  it('negotiateVersion() echoes every supported version the client asks for', () => {
    for (const v of SUPPORTED_PROTOCOL_VERSIONS) {
      assert.equal(negotiateVersion(v, '2025-06-18'), v);
      assert.equal(negotiateVersion(v, '2024-11-05'), v);
    }
  });

  it('negotiateVersion() answers an unsupported or malformed request with a supported version', () => {
    for (const requested of ['1999-01-01', '2024-10-07', '2026-07-28', '', 'latest', 42, null, undefined, {}, ['2025-06-18']]) {
      const got = negotiateVersion(requested, '2025-06-18');
      assert.ok(SUPPORTED_PROTOCOL_VERSIONS.includes(got), `${JSON.stringify(requested)} → ${got}`);
      assert.notEqual(got, requested);
    }
  });

  describe('through one shared server-everything child', () => {
    let h: Harness;
    before(async () => {
      // "sampler" is server-everything with sampling enabled for its shared child (sampling is opt-in per server).
      h = await startHarness({ servers: [everything(), srv('sampler', [EVERYTHING, 'stdio'], { clientCapabilities: ['sampling'] }), fixture('fix')] }, { limits: FAST });
      await h.proxy.ready(20_000);
    });
    after(() => h.stop());

    // Verified red on mutated copies of proxy.ts: without child-id rewriting (this test), without progress-token
    // rewriting (progress test), with resources/updated broadcast (subscription test) and with cancel ids not
    // rewritten (cancel test), each of those tests fails.
    it('32 concurrent SDK sessions (24 Streamable HTTP, 8 SSE) each get only their own answers', { timeout: 60_000 }, async () => {
      const pidBefore = h.proxy.status().everything!.pid;
      const clients = await Promise.all(Array.from({ length: 32 }, (_, i) => h.client('everything', i < 24 ? 'mcp' : 'sse')));
      assert.ok(h.proxy.status().everything!.sessions >= 32, `sessions ${h.proxy.status().everything!.sessions}`);
      let wrong = 0;
      let right = 0;
      await Promise.all(
        clients.map(async (client, i) => {
          await Promise.all(
            Array.from({ length: 5 }, async (_, j) => {
              const echo = await client.callTool({ name: 'echo', arguments: { message: `session-${i}-req-${j}` } });
              if (textOf(echo) === `Echo: session-${i}-req-${j}`) right++;
              else wrong++;
              const sum = await client.callTool({ name: 'get-sum', arguments: { a: i * 1000, b: j } });
              if (textOf(sum).includes(`is ${i * 1000 + j}.`)) right++;
              else wrong++;
            }),
          );
        }),
      );
      assert.equal(wrong, 0, 'answers delivered to the wrong session');
      assert.equal(right, 32 * 5 * 2);
      const after = h.proxy.status().everything!;
      assert.equal(after.pid, pidBefore, 'all sessions shared one child');
      assert.equal(after.restarts, 0);
      await Promise.all(clients.map((c) => c.close()));
    });

    it('progress notifications reach only the session whose request they belong to', { timeout: 30_000 }, async () => {
      const a = await h.client('everything', 'mcp');
      const b = await h.client('everything', 'mcp');
      const errors: unknown[] = [];
      a.onerror = (e) => errors.push(e);
      b.onerror = (e) => errors.push(e);
      const progressA: number[] = [];
      const progressB: number[] = [];
      // Both clients use the same request id (and so the same progressToken); the proxy must tell them apart.
      const [ra, rb] = await Promise.all([
        a.callTool({ name: 'trigger-long-running-operation', arguments: { duration: 0.4, steps: 4 } }, undefined, {
          onprogress: (p) => progressA.push(p.progress),
        }),
        b.callTool({ name: 'trigger-long-running-operation', arguments: { duration: 0.6, steps: 3 } }, undefined, {
          onprogress: (p) => progressB.push(p.progress),
        }),
      ]);
      assert.match(textOf(ra), /Steps: 4/);
      assert.match(textOf(rb), /Steps: 3/);
      assert.deepEqual(progressA, [1, 2, 3, 4]);
      assert.deepEqual(progressB, [1, 2, 3]);
      assert.deepEqual(errors.map(String).filter((e) => /progress/i.test(e)), [], 'no stray progress notifications');
    });

    it('resources/updated goes only to the sessions subscribed to that URI', { timeout: 30_000 }, async () => {
      const a = await h.client('everything', 'sse');
      const b = await h.client('everything', 'mcp');
      const c = await h.client('everything', 'sse');
      const got: Record<string, string[]> = { a: [], b: [], c: [] };
      for (const [k, cl] of [['a', a], ['b', b], ['c', c]] as const) {
        cl.setNotificationHandler(ResourceUpdatedNotificationSchema, (n) => {
          got[k]!.push(n.params.uri);
        });
      }
      const uriA = 'demo://resource/dynamic/text/1';
      const uriB = 'demo://resource/dynamic/text/2';
      await a.subscribeResource({ uri: uriA });
      await b.subscribeResource({ uri: uriB });
      // The child emits an update for every subscribed URI right away and then every 5 s.
      const toggled = await a.callTool({ name: 'toggle-subscriber-updates', arguments: {} });
      assert.match(textOf(toggled), /Started/);
      await waitFor(() => got.a!.length > 0 && got.b!.length > 0, 15_000, 'updates for a and b');
      await c.ping(); // a round trip on c after both updates went out
      await a.ping();
      assert.ok(got.a!.every((u) => u === uriA), `a got ${got.a}`);
      assert.ok(got.b!.every((u) => u === uriB), `b got ${got.b}`);
      assert.deepEqual(got.c, [], 'unsubscribed session gets no updates');
      const stopped = await a.callTool({ name: 'toggle-subscriber-updates', arguments: {} });
      assert.match(textOf(stopped), /Stopped/);
    });

    it('a child→client request (sampling/createMessage) goes to the session whose call caused it', { timeout: 30_000 }, async () => {
      const caps = { capabilities: { sampling: {} } };
      const idle = await h.client('sampler', 'mcp', {}, caps);
      const asker = await h.client('sampler', 'sse', {}, caps);
      const calls: string[] = [];
      for (const [who, c] of [['idle', idle], ['asker', asker]] as const) {
        c.setRequestHandler(CreateMessageRequestSchema, async () => {
          calls.push(who);
          return { model: 'test-model', role: 'assistant', content: { type: 'text', text: `sampled-by-${who}` } };
        });
      }
      await idle.ping(); // idle is now the most recently active session, so only in-flight tracking picks asker
      const tools = (await asker.listTools()).tools.map((t) => t.name);
      assert.ok(tools.includes('trigger-sampling-request'), 'the proxy declared sampling to the child ("clientCapabilities")');
      const r = await asker.callTool({ name: 'trigger-sampling-request', arguments: { prompt: 'hi', maxTokens: 5 } });
      assert.match(textOf(r), /sampled-by-asker/);
      assert.deepEqual(calls, ['asker']);
    });

    it('notifications/cancelled reaches the child with the id the child saw', { timeout: 30_000 }, async () => {
      const a = await h.client('fix', 'mcp');
      const observer = await h.client('fix', 'mcp');
      const seen = async () => JSON.parse(textOf(await observer.callTool({ name: 'do', arguments: { what: 'seen' } })));
      const before = (await seen()).hung.length as number;
      const ac = new AbortController();
      const hung = a.callTool({ name: 'do', arguments: { what: 'hang' } }, undefined, { signal: ac.signal });
      const childId = await waitFor(async () => {
        const s = await seen();
        return s.hung.length > before ? { id: s.hung[s.hung.length - 1] } : null;
      }, 10_000, 'child to receive the hanging request');
      ac.abort('test cancels');
      // The SDK itself rejects an aborted call with its RequestTimeout code and the abort reason.
      await assert.rejects(hung, isMcpError(-32001, 'test cancels'));
      const cancelled = await waitFor(async () => {
        const s = await seen();
        return s.cancelled.some((x: unknown) => x === childId.id) ? s.cancelled : null;
      }, 10_000, 'child to see notifications/cancelled for its own id');
      assert.ok(cancelled.includes(childId.id));
    });

    // Verified red on a copy of proxy.ts without abandonRequests() in endSession(): the POST hangs past the bound
    // and the child never sees notifications/cancelled.
    it('endSession() on DELETE answers a POST still waiting with SESSION_ENDED (-32004) and cancels its request on the child', { timeout: 30_000 }, async () => {
      const observer = await h.client('fix', 'mcp');
      const seen = async () => JSON.parse(textOf(await observer.callTool({ name: 'do', arguments: { what: 'seen' } })));
      const before = (await seen()).hung.length as number;
      const mcp = `${h.url}/fix/mcp`;
      const sid = await rawSession(h.url, 'fix');
      const waiting = post(mcp, call('in-flight', { what: 'hang' }), sessionHeaders(sid)); // JSON mode: Accept: application/json
      const childId = await waitFor(async () => {
        const s = await seen();
        return s.hung.length > before ? { id: s.hung[s.hung.length - 1] } : null;
      }, 10_000, 'child to receive the hanging request');
      const del = await request(mcp, { method: 'DELETE', headers: { 'mcp-session-id': sid } });
      assert.equal(del.status, 200, del.text);
      const res = await within(waiting, 5_000, 'the POST waiting on the ended session');
      const answer = onlyMessage(res);
      assert.equal(answer.id, 'in-flight');
      assert.deepEqual(answer.error, { code: -32004, message: 'Session ended' }, res.text);
      await waitFor(async () => (await seen()).cancelled.includes(childId.id), 10_000, 'child to see notifications/cancelled for its id');
    });

    it('a DELETE (terminateSession) ends the SDK session; its id then → 404', { timeout: 30_000 }, async () => {
      const client = new Client({ name: 'del', version: '1.0.0' });
      const transport = new StreamableHTTPClientTransport(new URL(`${h.url}/everything/mcp`));
      await client.connect(transport);
      const sid = transport.sessionId;
      assert.ok(sid);
      assert.equal((await post(`${h.url}/everything/mcp`, ping('p1'), sessionHeaders(sid))).status, 200);
      await transport.terminateSession();
      await client.close();
      assertRpcError(await post(`${h.url}/everything/mcp`, ping('p2'), sessionHeaders(sid)), 404, -32001);
    });

    it('withId(): an answer naming its id twice reaches the client under the client\'s id, never the child\'s (text and byte splices, JSON and SSE)', { timeout: 30_000 }, async () => {
      const mcp = `${h.url}/fix/mcp`;
      const sid = await rawSession(h.url, 'fix');
      // pad 20,000: over RAW_PASSTHROUGH_MIN_BYTES, where the child's bytes are spliced.
      for (const pad of [0, 20_000]) {
        for (const accept of ['application/json', 'text/event-stream']) {
          for (const id of [`mine-${pad}`, 4242 + pad]) {
            const res = await post(mcp, call(id, { what: 'dupid', pad }), sessionHeaders(sid, { accept }));
            assert.equal(res.status, 200, res.text.slice(0, 200));
            const msg = onlyMessage(res);
            assert.equal(msg.id, id, `${accept}, pad ${pad}: ${res.text.slice(0, 120)}`);
            assert.equal(textOf(msg.result), 'dup' + 'z'.repeat(pad));
          }
        }
      }
    });

    // Regression: a cancellation was answered with the timeout code.
    it('cancelFromClient(): the POST waiting for a cancelled request gets REQUEST_CANCELLED (-32800) "Request cancelled"', { timeout: 30_000 }, async () => {
      const observer = await h.client('fix', 'mcp');
      const seen = async () => JSON.parse(textOf(await observer.callTool({ name: 'do', arguments: { what: 'seen' } })));
      const before = (await seen()).hung.length as number;
      const mcp = `${h.url}/fix/mcp`;
      const sid = await rawSession(h.url, 'fix');
      const waiting = post(mcp, call('to-cancel', { what: 'hang' }), sessionHeaders(sid));
      await waitFor(async () => (await seen()).hung.length > before, 10_000, 'child to receive the hanging request');
      const note = await post(mcp, { jsonrpc: '2.0', method: 'notifications/cancelled', params: { requestId: 'to-cancel', reason: 'user' } }, sessionHeaders(sid));
      assert.equal(note.status, 202, note.text);
      const answer = onlyMessage(await within(waiting, 5_000, 'the cancelled request'));
      assert.deepEqual(answer, { jsonrpc: '2.0', id: 'to-cancel', error: { code: -32800, message: 'Request cancelled' } });
    });
  });

  // ── Roots, child→client requests, capabilities ──

  const initCaps = (log: string) => {
    const line = fileLines(log).find((l) => l.startsWith('initcaps '));
    return line === undefined ? undefined : JSON.parse(line.slice('initcaps '.length));
  };
  const asked = (r: Json) => JSON.parse(textOf(r)); // the fixture's 'ask': {result} or {error} the child got back

  it('a shared child is initialized with no client capabilities by default; "clientCapabilities" and "roots" add exactly those', { timeout: 20_000 }, async (t) => {
    const dir = tmpDir('caps');
    const logs = { plain: path.join(dir, 'plain'), both: path.join(dir, 'both'), rooted: path.join(dir, 'rooted') };
    await harness(t, {
      servers: [
        fixture('plain', 'ok', { env: { FIXTURE_LOG: logs.plain } }),
        fixture('both', 'ok', { env: { FIXTURE_LOG: logs.both }, clientCapabilities: ['sampling', 'elicitation'] }),
        fixture('rooted', 'ok', { env: { FIXTURE_LOG: logs.rooted }, roots: [dir] }),
      ],
    }, { limits: FAST }).then((h) => h.proxy.ready(10_000));
    assert.deepEqual(initCaps(logs.plain), {});
    assert.deepEqual(initCaps(logs.both), { sampling: {}, elicitation: {} });
    assert.deepEqual(initCaps(logs.rooted), { roots: { listChanged: false } });
  });

  it('a shared child is initialized with no client capabilities by default: server-everything lists the same tools through the proxy as to a direct client without capabilities', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [everything()] }, { limits: FAST });
    await h.proxy.ready(20_000);
    // Claude.ai declares none of sampling, elicitation, roots: it must see the tools a direct connection sees.
    const viaProxy = (await (await h.client('everything', 'mcp')).listTools()).tools.map((tool) => tool.name).sort();
    const direct = new Client({ name: 'direct', version: '1.0.0' }, { capabilities: {} });
    const transport = new StdioClientTransport({ command: NODE, args: [EVERYTHING, 'stdio'], stderr: 'ignore' });
    await direct.connect(transport);
    const pid = transport.pid;
    t.after(async () => {
      await direct.close();
      if (pid) await assertAllGone([], [pid]);
    });
    const directly = (await direct.listTools()).tools.map((tool) => tool.name).sort();
    assert.deepEqual(viaProxy, directly);
    for (const name of ['trigger-sampling-request', 'trigger-elicitation-request', 'get-roots-list']) assert.ok(!viaProxy.includes(name), name);
  });

  it('roots/list from a child is answered by the proxy from "roots" (file URLs, basenames); without "roots" → -32601; no client ever sees it', { timeout: 20_000 }, async (t) => {
    const a = fs.realpathSync(tmpDir('rootA'));
    const b = fs.realpathSync(tmpDir('rootB'));
    const h = await harness(t, { servers: [fixture('rooted', 'ok', { roots: [a, b] }), fixture('plain')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    for (const name of ['rooted', 'plain']) {
      for (const kind of ['sse', 'mcp'] as const) {
        const client = await h.client(name, kind, {}, { capabilities: { roots: { listChanged: true } } });
        let sawRoots = 0;
        client.setRequestHandler(ListRootsRequestSchema, async () => {
          sawRoots++;
          return { roots: [{ uri: 'file:///', name: 'client-machine' }] };
        });
        const got = asked(await client.callTool({ name: 'do', arguments: { what: 'ask', method: 'roots/list' } }));
        if (name === 'rooted') {
          assert.deepEqual(got, { result: { roots: [{ uri: pathToFileURL(a).href, name: path.basename(a) }, { uri: pathToFileURL(b).href, name: path.basename(b) }] } }, kind);
        } else {
          assert.equal(got.error?.code, -32601, `${kind}: ${JSON.stringify(got)}`);
        }
        assert.equal(sawRoots, 0, `${name}/${kind}: the client was asked for its roots`);
      }
    }
  });

  it('a client\'s notifications/roots/list_changed never reaches the child (shared, per-session, both transports); other notifications do', { timeout: 30_000 }, async (t) => {
    const dir = tmpDir('listchanged');
    const sharedLog = path.join(dir, 'shared');
    const soloLog = path.join(dir, 'solo');
    const pidFile = path.join(dir, 'pids');
    const h = await harness(t, {
      servers: [
        fixture('shared', 'ok', { env: { FIXTURE_LOG: sharedLog }, roots: [dir] }),
        fixture('solo', 'ok', { sessions: 'per-session', env: { FIXTURE_LOG: soloLog, FIXTURE_PIDFILE: pidFile } }),
      ],
    }, { limits: FAST });
    t.after(() => {
      for (const line of fileLines(pidFile)) h.groups.add(Number(line));
    });
    await h.proxy.ready(10_000);
    for (const [name, log] of [['shared', sharedLog], ['solo', soloLog]] as const) {
      const sid = await rawSession(h.url, name);
      const mcp = `${h.url}/${name}/mcp`;
      assert.equal((await post(mcp, { jsonrpc: '2.0', method: 'notifications/roots/list_changed' }, sessionHeaders(sid))).status, 202);
      assert.equal((await post(mcp, { jsonrpc: '2.0', method: 'notifications/marker/streamable' }, sessionHeaders(sid))).status, 202);
      const legacy = await legacySession(h.url, name, { roots: { listChanged: true } });
      try {
        assert.equal((await legacy.send({ jsonrpc: '2.0', method: 'notifications/roots/list_changed' })).status, 202);
        assert.equal((await legacy.send({ jsonrpc: '2.0', method: 'notifications/marker/legacy' })).status, 202);
        // A call behind them on each session: the child reads its stdin in order, so both notes are in by then.
        assert.equal((await legacy.send(call('barrier', { what: 'echo', text: 'b' }))).status, 202);
        await legacy.answer('barrier');
      } finally {
        legacy.stream.close();
      }
      assert.equal(textOf(onlyMessage(await post(mcp, call('barrier', { what: 'echo', text: 'b' }), sessionHeaders(sid))).result), 'b');
      const notes = fileLines(log).filter((l) => l.startsWith('note '));
      assert.ok(notes.includes('note notifications/marker/streamable') && notes.includes('note notifications/marker/legacy'), `${name}: ${notes.join(', ')}`);
      assert.deepEqual(notes.filter((l) => l.includes('roots')), [], `${name}: list_changed reached the child`);
    }
  });

  // The issue's reproduction: a session declaring roots answered roots/list with file:/// and server-filesystem
  // allowed / for every session, read and write, after that session left.
  async function rootsAttack(h: Harness, name: string, kind: 'sse' | 'mcp'): Promise<number> {
    const attacker = await h.client(name, kind, {}, { capabilities: { roots: { listChanged: true } } });
    let asked = 0;
    attacker.setRequestHandler(ListRootsRequestSchema, async () => {
      asked++;
      return { roots: [{ uri: 'file:///', name: 'everything' }] };
    });
    await attacker.sendRootsListChanged();
    // A call behind the notification on the same child: the child has handled the notification by its answer.
    await attacker.callTool({ name: 'list_allowed_directories', arguments: {} });
    return asked;
  }
  const allowedDirs = async (client: Client) => textOf(await client.callTool({ name: 'list_allowed_directories', arguments: {} }));

  it('server-filesystem with "roots": it is confined to the configured roots, and a client answering roots/list with file:/// widens nothing for anyone', { timeout: 40_000 }, async (t) => {
    const argDir = fs.realpathSync(tmpDir('fsarg'));
    const rootDir = fs.realpathSync(tmpDir('fsroot'));
    fs.writeFileSync(path.join(rootDir, 'inside.txt'), 'inside\n');
    const h = await harness(t, { servers: [srv('files', [FILESYSTEM, argDir], { roots: [rootDir] })] }, { limits: FAST });
    await h.proxy.ready(20_000);
    const victim = await h.client('files', 'mcp');
    const expected = `Allowed directories:\n${rootDir}`;
    // The child asks the proxy for roots right after initialization and replaces its directories with them.
    await waitFor(async () => (await allowedDirs(victim)) === expected, 5_000, `list_allowed_directories to be ${JSON.stringify(expected)}`);
    for (const kind of ['sse', 'mcp'] as const) assert.equal(await rootsAttack(h, 'files', kind), 0, `${kind} attacker was asked for roots`);
    assert.equal(await allowedDirs(victim), expected);
    const outside = await victim.callTool({ name: 'read_text_file', arguments: { path: '/etc/hostname' } });
    assert.equal(outside.isError, true);
    assert.match(textOf(outside), /Access denied/);
    assert.equal(textOf(await victim.callTool({ name: 'read_text_file', arguments: { path: path.join(rootDir, 'inside.txt') } })), 'inside\n');
  });

  it('server-filesystem without "roots": the roots capability is not declared, it keeps its command-line directory, and a file:/// answer widens nothing', { timeout: 40_000 }, async (t) => {
    const argDir = fs.realpathSync(tmpDir('fsarg'));
    const h = await harness(t, { servers: [srv('files', [FILESYSTEM, argDir])] }, { limits: FAST });
    await h.proxy.ready(20_000);
    const victim = await h.client('files', 'mcp');
    const expected = `Allowed directories:\n${argDir}`;
    assert.equal(await allowedDirs(victim), expected);
    for (const kind of ['sse', 'mcp'] as const) assert.equal(await rootsAttack(h, 'files', kind), 0, `${kind} attacker was asked for roots`);
    assert.equal(await allowedDirs(victim), expected);
    assert.equal((await victim.callTool({ name: 'read_text_file', arguments: { path: '/etc/hostname' } })).isError, true);
  });

  it('per-session server-filesystem: a session declaring roots and answering file:/// does not widen its own child', { timeout: 40_000 }, async (t) => {
    const argDir = fs.realpathSync(tmpDir('fsarg'));
    const h = await harness(t, { servers: [srv('files', [FILESYSTEM, argDir], { sessions: 'per-session' })] }, { limits: FAST });
    for (const kind of ['sse', 'mcp'] as const) {
      const attacker = await h.client('files', kind, {}, { capabilities: { roots: { listChanged: true } } });
      let asked = 0;
      attacker.setRequestHandler(ListRootsRequestSchema, async () => {
        asked++;
        return { roots: [{ uri: 'file:///', name: 'everything' }] };
      });
      await attacker.sendRootsListChanged();
      assert.equal(await allowedDirs(attacker), `Allowed directories:\n${argDir}`, kind);
      assert.equal(asked, 0, `${kind}: the session was asked for its roots`);
      assert.equal((await attacker.callTool({ name: 'read_text_file', arguments: { path: '/etc/hostname' } })).isError, true);
    }
  });

  describe('child→client requests on a shared child with "clientCapabilities"', () => {
    let h: Harness;
    let log: string;
    const lines: string[] = [];
    const samplingAnswer = (who: string) => ({ model: 'test-model', role: 'assistant' as const, content: { type: 'text' as const, text: `sampled-by-${who}` } });
    before(async () => {
      log = path.join(tmpDir('route'), 'fixture.log');
      h = await startHarness({ servers: [fixture('fix', 'ok', { clientCapabilities: ['sampling', 'elicitation'], env: { FIXTURE_LOG: log } })] }, { log: captureLog(lines), limits: FAST });
      await h.proxy.ready(10_000);
    });
    after(() => h.stop());

    async function capable(kind: 'sse' | 'mcp', who: string, calls: string[]) {
      const client = await h.client('fix', kind, {}, { capabilities: { sampling: {}, elicitation: {} } });
      client.setRequestHandler(CreateMessageRequestSchema, async () => {
        calls.push(`${who}:sampling`);
        return samplingAnswer(who);
      });
      client.setRequestHandler(ElicitRequestSchema, async () => {
        calls.push(`${who}:elicitation`);
        return { action: 'accept', content: { answer: who } };
      });
      return client;
    }

    it('with exactly one request in flight, from a session that declared the capability, it reaches that session (legacy stream or the POST\'s own event stream)', { timeout: 30_000 }, async () => {
      const calls: string[] = [];
      const idle = await capable('mcp', 'idle', calls);
      const sse = await capable('sse', 'sse', calls);
      const streamed = await capable('mcp', 'streamed', calls);
      await idle.ping();
      const viaSse = asked(await sse.callTool({ name: 'do', arguments: { what: 'ask', method: 'sampling/createMessage', params: { messages: [], maxTokens: 1 } } }));
      assert.deepEqual(viaSse, { result: samplingAnswer('sse') });
      const elicited = asked(await sse.callTool({ name: 'do', arguments: { what: 'ask', method: 'elicitation/create', params: { message: 'q', requestedSchema: { type: 'object', properties: {} } } } }));
      assert.deepEqual(elicited, { result: { action: 'accept', content: { answer: 'sse' } } });
      // Asking for progress makes the proxy answer this POST as an event stream; the request goes on it.
      const viaPost = asked(await streamed.callTool({ name: 'do', arguments: { what: 'ask', method: 'sampling/createMessage', params: { messages: [], maxTokens: 1 } } }, undefined, { onprogress: () => {} }));
      assert.deepEqual(viaPost, { result: samplingAnswer('streamed') });
      assert.deepEqual(calls, ['sse:sampling', 'sse:elicitation', 'streamed:sampling']);
    });

    it('from a session that did not declare the capability it is refused with -32601, even though an idle session declared it', { timeout: 30_000 }, async () => {
      const calls: string[] = [];
      await capable('sse', 'bystander', calls);
      const asker = await h.client('fix', 'mcp'); // declares nothing
      const params: Record<string, Json> = {
        'sampling/createMessage': { messages: [], maxTokens: 1 },
        'elicitation/create': { message: 'q', requestedSchema: { type: 'object', properties: {} } },
      };
      for (const method of ['sampling/createMessage', 'elicitation/create']) {
        const got = asked(await asker.callTool({ name: 'do', arguments: { what: 'ask', method, params: params[method] } }));
        assert.equal(got.error?.code, -32601, `${method}: ${JSON.stringify(got)}`);
        assert.match(got.error.message, /not routable/);
      }
      assert.deepEqual(calls, [], 'a session that did not ask was handed another session\'s request');
    });

    it('requests that could ask run one at a time (the lane): a second call waits for the first, a tools/list does not, and each ask reaches its own session', { timeout: 30_000 }, async () => {
      const calls: string[] = [];
      const first = await capable('mcp', 'first', calls);
      const second = await capable('sse', 'second', calls);
      let secondSent!: () => void;
      const secondStarted = new Promise<void>((resolve) => (secondSent = resolve));
      let listedWhileHeld = 0;
      // The first call's sampling request stays unanswered until the second call is in the proxy and a
      // tools/list (lane-free) has been answered beside it: without the lane the child would hold two calls
      // and its second request would be refused as unattributable.
      first.setRequestHandler(CreateMessageRequestSchema, async () => {
        calls.push('first:sampling');
        await secondStarted;
        listedWhileHeld = (await second.listTools()).tools.length;
        return samplingAnswer('first');
      });
      const ask = { what: 'ask', method: 'sampling/createMessage', params: { messages: [], maxTokens: 1 } };
      const one = first.callTool({ name: 'do', arguments: ask });
      await waitFor(() => calls.includes('first:sampling'), 5_000, 'the first call to ask');
      const two = second.callTool({ name: 'do', arguments: ask });
      secondSent();
      const [a, b] = await Promise.all([one, two]);
      assert.deepEqual(asked(a), { result: samplingAnswer('first') });
      assert.deepEqual(asked(b), { result: samplingAnswer('second') });
      assert.deepEqual(calls, ['first:sampling', 'second:sampling']);
      assert.equal(listedWhileHeld, 1, 'tools/list was answered while the lane was held');
    });
  });

  /** Three sessions call server-everything's trigger-sampling-request at once, each with its own prompt. */
  async function samplingRace(h: Harness, name: string, overlap = true): Promise<{ outcomes: string[]; wrong: string[] }> {
    const who = ['s0', 's1', 's2'];
    const state = { invoked: 0, settled: 0 };
    const wrong: string[] = [];
    // Two legacy SSE sessions and one Streamable HTTP session whose POST is answered as an event stream.
    const clients = await Promise.all(who.map((_, i) => h.client(name, i < 2 ? 'sse' : 'mcp', {}, { capabilities: { sampling: {} } })));
    clients.forEach((client, i) =>
      client.setRequestHandler(CreateMessageRequestSchema, async (req) => {
        state.invoked++;
        const prompt = JSON.stringify(req.params.messages);
        if (!prompt.includes(`prompt-of-${who[i]}.`)) wrong.push(`${who[i]} was asked ${prompt}`);
        // Keep every sampling request open until all three are out or the others have settled, so they overlap.
        if (overlap) await waitFor(() => state.invoked >= 3 || state.settled >= 2, 10_000, 'the other calls').catch(() => null);
        return { model: 'test-model', role: 'assistant', content: { type: 'text', text: `answer-of-${who[i]}` } };
      }),
    );
    const outcomes = await Promise.all(clients.map(async (client, i) => {
      try {
        const r = await client.callTool({ name: 'trigger-sampling-request', arguments: { prompt: `prompt-of-${who[i]}.`, maxTokens: 5 } }, undefined, i === 2 ? { onprogress: () => {} } : undefined);
        if (r.isError) return 'error';
        if (textOf(r).includes(`answer-of-${who[i]}"`)) return 'own';
        wrong.push(`${who[i]} got ${textOf(r)}`);
        return 'wrong';
      } catch {
        return 'error';
      } finally {
        state.settled++;
      }
    }));
    return { outcomes, wrong };
  }

  it('three sessions sampling at once through a shared child: the lane runs their calls one at a time, so each gets exactly its own answer', { timeout: 60_000 }, async (t) => {
    const h = await harness(t, { servers: [srv('sampler', [EVERYTHING, 'stdio'], { clientCapabilities: ['sampling'] })] }, { limits: FAST });
    await h.proxy.ready(20_000);
    for (let round = 0; round < 3; round++) {
      // The calls cannot overlap on the child (that is the point), so the handlers do not wait for each other.
      const { outcomes, wrong } = await samplingRace(h, 'sampler', false);
      assert.deepEqual(wrong, [], `round ${round}`);
      assert.deepEqual(outcomes, ['own', 'own', 'own'], `round ${round}`);
    }
  });

  it('per-session mode: three sessions sampling at once each get exactly their own answer; elicitation works too', { timeout: 60_000 }, async (t) => {
    const h = await harness(t, { servers: [srv('solo', [EVERYTHING, 'stdio'], { sessions: 'per-session' })] }, { limits: FAST });
    const { outcomes, wrong } = await samplingRace(h, 'solo');
    assert.deepEqual(wrong, []);
    assert.deepEqual(outcomes, ['own', 'own', 'own']);
    const client = await h.client('solo', 'mcp', {}, { capabilities: { elicitation: {} } });
    client.setRequestHandler(ElicitRequestSchema, async () => ({ action: 'accept', content: { name: 'Ada Lovelace' } }));
    const tools = (await client.listTools()).tools.map((tool) => tool.name);
    assert.ok(tools.includes('trigger-elicitation-request') && !tools.includes('trigger-sampling-request'), `the child got this session's capabilities: ${tools.join(', ')}`);
    assert.match(textOf(await client.callTool({ name: 'trigger-elicitation-request', arguments: {} })), /Ada Lovelace/);
  });

  it('per-session mode: the child starts at the session\'s initialize (both transports) with that session\'s sampling/elicitation, never its roots', { timeout: 30_000 }, async (t) => {
    const dir = tmpDir('percaps');
    const pidFile = path.join(dir, 'pids');
    const h = await harness(t, {
      servers: [
        fixture('solo', 'ok', { sessions: 'per-session', env: { FIXTURE_PIDFILE: pidFile } }),
        fixture('rooted', 'ok', { sessions: 'per-session', env: { FIXTURE_PIDFILE: pidFile }, roots: [dir] }),
      ],
    }, { limits: FAST });
    t.after(() => {
      for (const line of fileLines(pidFile)) h.groups.add(Number(line));
    });
    const capsOf = async (client: Client) => JSON.parse(textOf(await client.callTool({ name: 'do', arguments: { what: 'seen' } }))).initCaps;
    const all = { sampling: {}, elicitation: {}, roots: { listChanged: true } };
    assert.deepEqual(await capsOf(await h.client('solo', 'mcp', {}, { capabilities: all })), { sampling: {}, elicitation: {} });
    assert.deepEqual(await capsOf(await h.client('solo', 'sse', {}, { capabilities: { sampling: {} } })), { sampling: {} });
    assert.deepEqual(await capsOf(await h.client('solo', 'mcp')), {});
    assert.deepEqual(await capsOf(await h.client('rooted', 'sse', {}, { capabilities: all })), { sampling: {}, elicitation: {}, roots: { listChanged: false } });
    // A legacy stream alone starts no child: that waits for the session's initialize.
    const before = h.proxy.status().solo!.pids.length;
    const stream = await openSse(`${h.url}/solo/sse`);
    try {
      await stream.next((e) => e.event === 'endpoint', 5_000, 'endpoint');
      assert.equal(h.proxy.status().solo!.pids.length, before, 'a child was started before initialize');
    } finally {
      stream.close();
    }
  });

  // Regression: 100,000 unanswered child→client requests grew the routing maps without bound.
  it('maxServerRequestsPerChild: under and at the limit child→client requests are delivered; one over → the child gets -32000; an answer makes room', { timeout: 30_000 }, async (t) => {
    const log = path.join(tmpDir('flood'), 'fixture.log');
    const h = await harness(t, { servers: [fixture('fix', 'ok', { clientCapabilities: ['sampling'], env: { FIXTURE_LOG: log } })] }, { limits: { ...FAST, maxServerRequestsPerChild: 3 } });
    await h.proxy.ready(10_000);
    const s = await legacySession(h.url, 'fix', { sampling: {} });
    try {
      const samplings = () => s.stream.events.filter((e) => e.event === 'message' && JSON.parse(e.data).method === 'sampling/createMessage').map((e) => JSON.parse(e.data));
      assert.equal((await s.send(call('flood', { what: 'flood', count: 4, method: 'sampling/createMessage', params: { messages: [], maxTokens: 1 } }))).status, 202);
      assert.equal(textOf((await s.answer('flood')).result), 'sent 4');
      assert.equal(samplings().length, 3, 'the requests before the answer on the stream: 3 delivered (under, under, at)');
      const responses = () => fileLines(log).filter((l) => l.startsWith('response '));
      const refused = await waitFor(() => responses().find((l) => l.startsWith('response "flood-4" ')), 5_000, 'the child to get an answer for the 4th');
      assert.equal(JSON.parse(refused.slice('response "flood-4" '.length)).error?.code, -32000, refused);
      assert.equal(responses().length, 1, 'the three delivered are still waiting for the client');
      // The client answers one: there is room for one more.
      const first = samplings()[0];
      assert.equal((await s.send({ jsonrpc: '2.0', id: first.id, result: { model: 'm', role: 'assistant', content: { type: 'text', text: 'late' } } })).status, 202);
      await waitFor(() => responses().some((l) => l.startsWith('response "flood-1" {"result"')), 5_000, 'the answer to reach the child');
      assert.equal((await s.send(call('flood2', { what: 'flood', count: 1, method: 'sampling/createMessage', params: { messages: [], maxTokens: 1 } }))).status, 202);
      await s.answer('flood2');
      assert.equal(samplings().length, 4, 'delivered once an answer made room');
    } finally {
      s.stream.close();
    }
  });

  // F3. A shared child's sampling request was pinned on the one session in flight, though it could come from
  // the work of a request given up on (another user's). Since 459e62d that presumption lasts ABANDONED_GRACE_MS
  // (30 s) at most: this test ends well within it.
  it('F3 shared child with "clientCapabilities": after B cancels (or DELETEs its session) while the child still works for it, sampling/createMessage with only A in flight goes to nobody: the child gets -32601, warn "given up on"; once the child answers B\'s request, A gets it again', { timeout: 20_000 }, async (t) => {
    const lines: string[] = [];
    const f = reviewFiles('f3');
    const h = await reviewHarness(t, { servers: [reviewFixture('fix', 'ok', { FIXTURE_PIDFILE: f.pidFile, FIXTURE_LOG: f.log }, { clientCapabilities: ['sampling'] })] },
      { log: captureLog(lines), limits: FAST }, f.pidFile);
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const caps = { sampling: {} };
    const a = await reviewSession(h.url, 'fix', { caps });
    const hangs = () => fileLines(f.log).filter((l) => l.startsWith('hang ')).length;
    const ask = (id: string) => openRpcStream(mcp, {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'text/event-stream', 'mcp-session-id': a },
      body: JSON.stringify(call(id, { what: 'ask', method: 'sampling/createMessage', params: { messages: [{ role: 'user', content: { type: 'text', text: 'B\'s prompt' } }], maxTokens: 5 } })),
    });
    const REFUSED = 'warn [fix] refused sampling/createMessage from the server: a request given up on (cancelled, timed out or of an ended session) may still be running on this shared server, so the request\'s session is not certain; set "sessions": "per-session" for this server to use sampling/createMessage';

    for (const variant of ['cancel', 'delete'] as const) {
      const b = await reviewSession(h.url, 'fix', { caps });
      const before = hangs();
      const bCall = post(mcp, call(7, { what: 'hang' }), reviewHeaders(b));
      await waitFor(() => hangs() > before, 5_000, 'B\'s request running on the child');
      if (variant === 'cancel') {
        const note = await post(mcp, { jsonrpc: '2.0', method: 'notifications/cancelled', params: { requestId: 7, reason: 'stop' } }, reviewHeaders(b));
        assert.equal(note.status, 202);
        assert.deepEqual(JSON.parse((await bCall).text), { jsonrpc: '2.0', id: 7, error: { code: -32800, message: 'Request cancelled' } });
      } else {
        assert.equal((await request(mcp, { method: 'DELETE', headers: { 'mcp-session-id': b } })).status, 200);
        assert.deepEqual(JSON.parse((await bCall).text), { jsonrpc: '2.0', id: 7, error: { code: -32004, message: 'Session ended' } });
      }
      // A's call is the only one in flight; the child asks for sampling (it may be for B's work).
      const from = lines.length;
      const s1 = await ask(`a-${variant}-1`);
      const first = await nextMessage(s1, (m) => m.method === 'sampling/createMessage' || m.id === `a-${variant}-1`, 5_000, `${variant}: A's answer or a sampling request`);
      assert.equal(first.method, undefined, `${variant}: A was handed a sampling request: ${JSON.stringify(first)}`);
      assert.deepEqual(JSON.parse(first.result.content[0].text), { error: { code: -32601, message: 'Client cannot take sampling/createMessage: not routable through this proxy' } });
      assert.deepEqual(lines.slice(from).filter((l) => l.startsWith('warn [fix] refused')), [REFUSED]);
      // The child answers B's request late: nothing is left running for anyone else, so A is certain again.
      assert.equal(answerText(await post(mcp, call(`rel-${variant}`, { what: 'release' }), reviewHeaders(a))), 'released');
      const s2 = await ask(`a-${variant}-2`);
      const req = await nextMessage(s2, (m) => m.method === 'sampling/createMessage', 5_000, `${variant}: the sampling request on A's stream`);
      assert.match(String(req.id), /^proxy-\d+$/);
      const back = await post(mcp, { jsonrpc: '2.0', id: req.id, result: { model: 'm', role: 'assistant', content: { type: 'text', text: 'from A' } } }, reviewHeaders(a));
      assert.equal(back.status, 202);
      const done = await nextMessage(s2, (m) => m.id === `a-${variant}-2`, 5_000, `${variant}: A's answer`);
      assert.deepEqual(JSON.parse(done.result.content[0].text), { result: { model: 'm', role: 'assistant', content: { type: 'text', text: 'from A' } } });
    }
  });

  // F6. A child reusing one id for its requests overwrote their routing and got around maxServerRequestsPerChild.
  it('F6 a child sending requests under an id still waiting for a client: only the first is delivered; each other one gets -32600 "Duplicate request id" (warn "its id is that of a request still waiting")', { timeout: 20_000 }, async (t) => {
    const lines: string[] = [];
    const f = reviewFiles('f6');
    const h = await reviewHarness(t, { servers: [reviewFixture('fix', 'ok', { FIXTURE_PIDFILE: f.pidFile, FIXTURE_LOG: f.log }, { sessions: 'per-session' })] },
      { log: captureLog(lines), limits: FAST }, f.pidFile);
    const mcp = `${h.url}/fix/mcp`;
    const sid = await reviewSession(h.url, 'fix', { caps: { sampling: {} } });
    const stream = await openRpcStream(mcp, { headers: { 'mcp-session-id': sid } });
    onCleanup(t, () => stream.close());
    assert.equal(stream.res.statusCode, 200);
    const res = await post(mcp, call('flood', { what: 'floodsame', count: 5, id: 'dup', method: 'sampling/createMessage', params: { messages: [], maxTokens: 1 } }), reviewHeaders(sid));
    assert.equal(answerText(res), 'sent 5');
    // The stream is in order: when the end marker is there, every request the proxy delivered is before it.
    await nextMessage(stream, (m) => m.method === 'notifications/message' && m.params.data === 'flood-done', 5_000, 'the end marker');
    const delivered = streamMessages(stream).filter((m) => m.method === 'sampling/createMessage');
    assert.equal(delivered.length, 1, `delivered ${delivered.length} requests under one id`);
    const DUP = 'response "dup" {"error":{"code":-32600,"message":"Duplicate request id"}}';
    await waitFor(() => fileLines(f.log).filter((l) => l === DUP).length === 4, 5_000, 'four -32600 answers on the child');
    assert.deepEqual(lines.filter((l) => l.startsWith('warn [fix]')), Array(4).fill('warn [fix] refused sampling/createMessage: its id is that of a request still waiting for a client'));
    // The first one still reaches the child with the client's answer.
    const back = await post(mcp, { jsonrpc: '2.0', id: delivered[0].id, result: { model: 'm', role: 'assistant', content: { type: 'text', text: 'ok' } } }, reviewHeaders(sid));
    assert.equal(back.status, 202);
    await waitFor(() => fileLines(f.log).some((l) => l.startsWith('response "dup" {"result"')), 5_000, 'the answer to the first one');
  });
});

// ── 7. HTTP: guards, /mcp, /sse, health ─────────────────────────────────────────────────────────────────

describe('7. HTTP: guards, /mcp, /sse, health', () => {
  describe('one proxy with everything, memory, filesystem and a fixture', () => {
    let h: Harness;
    let fsDir: string;
    let memoryFile: string;
    let mcp: string;
    before(async () => {
      fsDir = tmpDir('fs');
      fs.writeFileSync(path.join(fsDir, 'hello.txt'), 'hello from the filesystem server\n');
      memoryFile = path.join(tmpDir('mem'), 'memory.jsonl');
      h = await startHarness(
        {
          servers: [
            everything(),
            srv('memory', [MEMORY], { env: { MEMORY_FILE_PATH: memoryFile } }),
            srv('filesystem', [FILESYSTEM, fsDir]),
            fixture('fix'),
          ],
        },
        { limits: FAST },
      );
      await h.proxy.ready(30_000);
      mcp = `${h.url}/fix/mcp`;
    });
    after(() => h.stop());

    it('GET /healthz → 200', async () => {
      assert.equal((await request(`${h.url}/healthz`)).status, 200);
    });

    it('GET /readyz → 200 with every server ready', async () => {
      const res = await request(`${h.url}/readyz`);
      assert.equal(res.status, 200, res.text);
      const body = JSON.parse(res.text);
      for (const name of ['everything', 'memory', 'filesystem', 'fix']) assert.equal(body.servers[name]?.state, 'ready', name);
    });

    it('status() reports every server ready with a pid and no restarts', () => {
      const st = h.proxy.status();
      assert.deepEqual(Object.keys(st).sort(), ['everything', 'filesystem', 'fix', 'memory']);
      for (const s of Object.values(st)) {
        assert.equal(s.state, 'ready');
        assert.equal(typeof s.pid, 'number');
        assert.equal(s.restarts, 0);
      }
    });

    it('an unknown server name → 404 without listing the configured names', async () => {
      // (/FIX/mcp is /fix/mcp: paths are matched case-insensitively, section 4. / is the status page, section 10.)
      for (const p of ['/nope/mcp', '/nope/sse', '/fix', '/fix/other', '/fix/mcp/extra', '/fi%78/mcp']) {
        const res = await request(`${h.url}${p}`, { method: 'GET', headers: { accept: 'text/event-stream' } });
        assert.equal(assertRpcError(res, 404, -32000).error.message, 'Not Found', p);
        for (const name of ['everything', 'memory', 'filesystem']) assert.ok(!res.text.includes(name), `${p} body lists ${name}`);
      }
      assertRpcError(await post(`${h.url}/nope/mcp`, initMsg()), 404, -32000);
    });

    it('POST initialize → 200 with a visible-ASCII Mcp-Session-Id, unique per session', async () => {
      const r1 = await post(mcp, initMsg(0, '2025-06-18'), { accept: 'application/json' });
      const r2 = await post(mcp, initMsg(0, '2025-06-18'), { accept: 'application/json' });
      assert.equal(r1.status, 200, r1.text);
      const sid1 = String(r1.headers['mcp-session-id']);
      const sid2 = String(r2.headers['mcp-session-id']);
      assert.match(sid1, /^[\x21-\x7e]{16,}$/);
      assert.notEqual(sid1, sid2);
      const msg = onlyMessage(r1);
      assert.equal(msg.id, 0);
      assert.equal(msg.result.protocolVersion, '2025-06-18');
      assert.equal(msg.result.serverInfo.name, 'fixture');
    });

    it('initialize with an unsupported protocolVersion gets a supported one back', async () => {
      const res = await post(mcp, initMsg(1, '1999-01-01'), { accept: 'application/json' });
      assert.equal(res.status, 200, res.text);
      assert.ok(SUPPORTED_PROTOCOL_VERSIONS.includes(onlyMessage(res).result.protocolVersion));
    });

    it('a non-initialize request without a session → 400 -32000, id null', async () => {
      const body = assertRpcError(await post(mcp, ping(1)), 400, -32000);
      assert.equal(body.id, null);
    });

    it('an unknown session → 404 -32001', async () => {
      for (const sid of ['no-such-session', 'a'.repeat(64)]) {
        const body = assertRpcError(await post(mcp, ping(1), { 'mcp-session-id': sid }), 404, -32001);
        assert.equal(body.error.message, 'Session not found');
      }
    });

    it('notifications/initialized without a session → 202', async () => {
      const res = await post(mcp, { jsonrpc: '2.0', method: 'notifications/initialized' });
      assert.equal(res.status, 202);
      assert.equal(res.text, '');
    });

    it('server/discover without a session → 400 -32000 (legacy evidence for 2026 clients)', async () => {
      const res = await post(mcp, { jsonrpc: '2.0', id: 1, method: 'server/discover', params: {} });
      assertRpcError(res, 400, -32000);
    });

    it('bad JSON → 400 -32700', async () => {
      const sid = await rawSession(h.url, 'fix');
      for (const text of ['{"jsonrpc":', '{bad json}', '\u0000', '{"jsonrpc":"2.0","id":1,"method":"ping"} trailing']) {
        assertRpcError(await post(mcp, text, sessionHeaders(sid)), 400, -32700);
      }
    });

    it('well-formed JSON that is not JSON-RPC → 400 -32600', async () => {
      const sid = await rawSession(h.url, 'fix');
      for (const body of ['{"foo":1}', '42', '"str"', 'null', '[]', '{"jsonrpc":"1.0","id":1,"method":"ping"}', '{"jsonrpc":"2.0","id":1,"method":5}']) {
        assertRpcError(await post(mcp, body, sessionHeaders(sid)), 400, -32600);
      }
    });

    // Verified red on a copy of proxy.ts without the batch/version check in handleMcpPost(): both batches → 200.
    it('a batch in a 2025-06-18 or 2025-11-25 session → 400 -32600; in a 2025-03-26 session it is answered', async () => {
      for (const version of ['2025-06-18', '2025-11-25']) {
        const sid = await rawSession(h.url, 'fix', version);
        const headers = sessionHeaders(sid, { 'mcp-protocol-version': version });
        assertRpcError(await post(mcp, [ping('b1'), ping('b2')], headers), 400, -32600);
        assert.deepEqual(onlyMessage(await post(mcp, ping('after'), headers)), { jsonrpc: '2.0', id: 'after', result: {} }, `${version} session still works`);
      }
      const sid = await rawSession(h.url, 'fix', '2025-03-26');
      const res = await post(mcp, [ping('b1'), ping('b2')], sessionHeaders(sid, { 'mcp-protocol-version': '2025-03-26' }));
      assert.equal(res.status, 200, res.text);
      assert.deepEqual(messages(res).map((m) => m.id).sort(), ['b1', 'b2']);
    });

    it('a Content-Type other than JSON → 415; application/json with charset is fine', async () => {
      const sid = await rawSession(h.url, 'fix');
      for (const type of ['text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data']) {
        const res = await post(mcp, ping(1), sessionHeaders(sid, { 'content-type': type }));
        assertRpcError(res, 415, -32000);
      }
      const ok = await post(mcp, ping(2), sessionHeaders(sid, { 'content-type': 'application/json; charset=utf-8' }));
      assert.equal(ok.status, 200, ok.text);
      assert.deepEqual(onlyMessage(ok), { jsonrpc: '2.0', id: 2, result: {} });
    });

    it('an Accept with neither application/json nor text/event-stream → 406', async () => {
      const sid = await rawSession(h.url, 'fix');
      for (const accept of ['text/html', 'image/png', 'application/xml']) {
        assertRpcError(await post(mcp, ping(1), sessionHeaders(sid, { accept })), 406, -32000);
      }
    });

    it('Accept missing, */* or application/json alone → 200 with an application/json response', async () => {
      const sid = await rawSession(h.url, 'fix');
      const variants: Record<string, string>[] = [{}, { accept: '*/*' }, { accept: 'application/json' }];
      for (const [i, accept] of variants.entries()) {
        const headers: Record<string, string> = { 'content-type': 'application/json', 'mcp-session-id': sid, ...accept };
        const res = await request(mcp, { method: 'POST', headers, body: JSON.stringify(ping(i)) });
        assert.equal(res.status, 200, `${JSON.stringify(accept)}: ${res.text}`);
        assert.match(String(res.headers['content-type']), /^application\/json/);
        assert.deepEqual(JSON.parse(res.text), { jsonrpc: '2.0', id: i, result: {} });
      }
      const both = await post(mcp, ping(9), { 'mcp-session-id': sid });
      assert.equal(both.status, 200);
      assert.deepEqual(onlyMessage(both), { jsonrpc: '2.0', id: 9, result: {} });
    });

    it('an unsupported MCP-Protocol-Version → 400; any supported one is accepted; 2026-07-28 without a claim in _meta → 400 -32602 (the modern path)', async () => {
      const sid = await rawSession(h.url, 'fix', '2025-06-18');
      for (const v of ['1999-01-01', 'banana']) {
        const res = await post(mcp, ping(1), sessionHeaders(sid, { 'mcp-protocol-version': v }));
        assertRpcError(res, 400, -32000);
      }
      const modernHeader = await post(mcp, ping(1), sessionHeaders(sid, { 'mcp-protocol-version': '2026-07-28' }));
      assert.equal(assertRpcError(modernHeader, 400, -32602).id, 1);
      for (const v of SUPPORTED_PROTOCOL_VERSIONS) {
        const res = await post(mcp, ping(2), sessionHeaders(sid, { 'mcp-protocol-version': v }));
        assert.equal(res.status, 200, `${v}: ${res.text}`);
      }
      const none = await post(mcp, ping(3), { accept: 'application/json', 'mcp-session-id': sid });
      assert.equal(none.status, 200, 'header may be absent');
    });

    it('other methods on /{name}/mcp → 405 with Allow: GET, POST, DELETE', async () => {
      for (const method of ['PUT', 'PATCH']) {
        const res = await request(mcp, { method, headers: { 'content-type': 'application/json' }, body: '{}' });
        assertRpcError(res, 405, -32000);
        const allow = String(res.headers.allow ?? '').split(/\s*,\s*/).sort();
        assert.deepEqual(allow, ['DELETE', 'GET', 'POST']);
      }
    });

    it('POST /{name}/sse → 405 (so 2025-11-25 clients fall back to GET)', async () => {
      const res = await post(`${h.url}/fix/sse`, initMsg());
      assertRpcError(res, 405, -32000);
      assert.equal(res.headers.allow, 'GET');
    });

    it('GET /{name}/mcp with a session opens an event stream', async () => {
      const sid = await rawSession(h.url, 'fix');
      const stream = await openSse(mcp, { 'mcp-session-id': sid });
      try {
        assert.equal(stream.res.statusCode, 200);
        assert.match(String(stream.res.headers['content-type']), /^text\/event-stream/);
      } finally {
        stream.close();
      }
    });

    it('DELETE ends a session; later requests on it → 404', async () => {
      const sid = await rawSession(h.url, 'fix');
      const del = await request(mcp, { method: 'DELETE', headers: { 'mcp-session-id': sid } });
      assert.equal(del.status, 200);
      assert.equal(del.text, '{}');
      assertRpcError(await post(mcp, ping(1), sessionHeaders(sid)), 404, -32001);
    });

    it('GET /{name}/sse sends the endpoint event first; responses arrive as message events', async () => {
      const stream = await openSse(`${h.url}/fix/sse`);
      try {
        assert.equal(stream.res.statusCode, 200);
        assert.match(String(stream.res.headers['content-type']), /^text\/event-stream/);
        const first = await stream.next(() => true, 5_000, 'first event');
        assert.equal(first.event, 'endpoint');
        assert.match(first.data, /^\/fix\/messages\?sessionId=[\x21-\x7e]+$/);
        const endpoint = `${h.url}${first.data}`;
        const res = await post(endpoint, initMsg(7, '2024-11-05'));
        assert.equal(res.status, 202, res.text);
        const answer = await stream.next((e) => e.event === 'message' && JSON.parse(e.data).id === 7, 5_000, 'initialize result');
        assert.equal(JSON.parse(answer.data).result.protocolVersion, '2024-11-05');
        assert.equal((await post(endpoint, { jsonrpc: '2.0', method: 'notifications/initialized' })).status, 202);
        assert.equal((await post(endpoint, call(8, { what: 'echo', text: 'over sse' }))).status, 202);
        const echoed = await stream.next((e) => e.event === 'message' && JSON.parse(e.data).id === 8, 5_000, 'echo result');
        assert.equal(textOf(JSON.parse(echoed.data).result), 'over sse');
      } finally {
        stream.close();
      }
    });

    it('a session id works only on the server and transport that issued it (else 404)', async () => {
      const sid = await rawSession(h.url, 'fix');
      assertRpcError(await post(`${h.url}/everything/mcp`, ping(1), sessionHeaders(sid)), 404, -32001);
      assert.equal((await post(`${h.url}/fix/messages?sessionId=${encodeURIComponent(sid)}`, ping(2))).status, 404);
      const stream = await openSse(`${h.url}/fix/sse`);
      try {
        const ep = await stream.next((e) => e.event === 'endpoint', 5_000, 'endpoint');
        const legacyId = new URL(ep.data, h.url).searchParams.get('sessionId')!;
        assertRpcError(await post(mcp, ping(3), sessionHeaders(legacyId)), 404, -32001);
        assert.equal((await post(`${h.url}/everything/messages?sessionId=${encodeURIComponent(legacyId)}`, ping(4))).status, 404);
      } finally {
        stream.close();
      }
    });

    it('CORS is off by default: no Access-Control-Allow-Origin, even for an allowed Origin', async () => {
      const res = await post(mcp, initMsg(), { accept: 'application/json', origin: 'https://claude.ai' });
      assert.equal(res.status, 200);
      assert.equal(res.headers['access-control-allow-origin'], undefined);
    });

    it('POST /{name}/messages with an unknown sessionId → 404', async () => {
      const res = await post(`${h.url}/fix/messages?sessionId=does-not-exist`, ping(1));
      assert.equal(assertRpcError(res, 404, -32001).error.message, 'Session not found');
    });

    it('a foreign Origin → 403; own origin and https://claude.ai are allowed', async () => {
      for (const origin of ['https://evil.example', 'http://localhost.evil.example', 'null', 'https://claude.ai.evil.example']) {
        const res = await post(mcp, initMsg(), { accept: 'application/json', origin });
        assertRpcError(res, 403, -32000);
        assert.equal(res.headers['mcp-session-id'], undefined);
      }
      for (const origin of [h.url, 'https://claude.ai']) {
        const res = await post(mcp, initMsg(), { accept: 'application/json', origin });
        assert.equal(res.status, 200, `${origin}: ${res.text}`);
      }
      const sse = await openSse(`${h.url}/fix/sse`, { origin: 'https://evil.example' });
      sse.close();
      assert.equal(sse.res.statusCode, 403);
    });

    it('a non-loopback Host → 403; localhost, 127.0.0.1 and [::1] on any port are allowed', async () => {
      for (const host of ['evil.example.com', 'evil.example.com:80', '127.0.0.1.nip.io', '10.0.0.1']) {
        const res = await post(mcp, initMsg(), { accept: 'application/json', host });
        assertRpcError(res, 403, -32000);
      }
      for (const host of ['localhost', 'localhost:1234', '127.0.0.1', `127.0.0.1:${h.proxy.port}`, '[::1]:8080']) {
        const res = await post(mcp, initMsg(), { accept: 'application/json', host });
        assert.equal(res.status, 200, `${host}: ${res.text}`);
      }
    });

    for (const kind of ['mcp', 'sse'] as const) {
      it(`SDK ${kind === 'mcp' ? 'Streamable HTTP' : 'SSE'} client: tools, resources and prompts of server-everything`, { timeout: 30_000 }, async () => {
        const client = await h.client('everything', kind);
        const tools = (await client.listTools()).tools.map((t) => t.name);
        for (const name of ['echo', 'get-sum', 'trigger-long-running-operation']) assert.ok(tools.includes(name), name);
        assert.equal(textOf(await client.callTool({ name: 'echo', arguments: { message: `via ${kind}` } })), `Echo: via ${kind}`);
        const structured = await client.callTool({ name: 'get-structured-content', arguments: { location: 'New York' } });
        assert.ok(structured.structuredContent, 'structured content passes through');
        const resources = (await client.listResources()).resources;
        assert.ok(resources.length > 0);
        const doc = resources.find((r) => r.uri.endsWith('features.md')) ?? resources[0]!;
        const read = await client.readResource({ uri: doc.uri });
        assert.equal(read.contents[0]?.uri, doc.uri);
        assert.ok(String((read.contents[0] as { text?: string }).text ?? '').length > 0);
        const prompts = (await client.listPrompts()).prompts.map((p) => p.name);
        assert.ok(prompts.includes('simple-prompt') && prompts.includes('args-prompt'), prompts.join());
        const prompt = await client.getPrompt({ name: 'args-prompt', arguments: { city: 'Lisbon' } });
        assert.match(JSON.stringify(prompt.messages), /Lisbon/);
        assert.equal(client.getServerVersion()?.name, 'mcp-servers/everything');
      });

      it(`SDK ${kind === 'mcp' ? 'Streamable HTTP' : 'SSE'} client: server-memory tools and resources, and its errors pass through`, { timeout: 30_000 }, async () => {
        const client = await h.client('memory', kind);
        const tools = (await client.listTools()).tools.map((t) => t.name);
        assert.ok(tools.includes('create_entities') && tools.includes('read_graph'), tools.join());
        const entity = `Entity_${kind}_${process.pid}`;
        await client.callTool({
          name: 'create_entities',
          arguments: { entities: [{ name: entity, entityType: 'test', observations: [`made via ${kind}`] }] },
        });
        const graph = await client.callTool({ name: 'read_graph', arguments: {} });
        assert.match(JSON.stringify(graph), new RegExp(entity));
        const resources = (await client.listResources()).resources.map((r) => r.uri);
        assert.ok(resources.includes('memory://knowledge-graph'), resources.join());
        const read = await client.readResource({ uri: 'memory://knowledge-graph' });
        assert.match(JSON.stringify(read.contents), new RegExp(entity));
        // server-memory has no prompts: the child's own JSON-RPC error must reach the client.
        await assert.rejects(client.listPrompts(), (err: Error & { code?: number }) => err.code === -32601);
      });
    }

    it('SDK client: server-filesystem reads a file from its allowed directory', { timeout: 30_000 }, async () => {
      const client = await h.client('filesystem', 'mcp');
      const r = await client.callTool({ name: 'read_text_file', arguments: { path: path.join(fsDir, 'hello.txt') } });
      assert.match(textOf(r), /hello from the filesystem server/);
    });
  });

  describe('auth and origins', () => {
    let h: Harness;
    let mcp: string;
    before(async () => {
      h = await startHarness(
        { servers: [fixture('fix')] },
        { tokens: ['token-one-aaaaaaaa', 'token-two-bbbbbbbb'], allowedOrigins: ['https://app.example.org'], limits: FAST },
      );
      await h.proxy.ready(10_000);
      mcp = `${h.url}/fix/mcp`;
    });
    after(() => h.stop());

    it('no Authorization → 401 with WWW-Authenticate: Bearer', async () => {
      for (const [url, method] of [[mcp, 'POST'], [`${h.url}/fix/sse`, 'GET'], [mcp, 'GET'], [mcp, 'DELETE']] as const) {
        const res = await request(url, { method, headers: JSON_HEADERS, body: method === 'POST' ? JSON.stringify(initMsg()) : undefined });
        assertRpcError(res, 401, -32000);
        assert.match(String(res.headers['www-authenticate']), /^Bearer\b/);
      }
    });

    it('a wrong, partial or query-string token → 401', async () => {
      for (const auth of ['Bearer token-one-aaaaaaa', 'Bearer token-one-aaaaaaaaX', 'Bearer ', 'Basic dG9rZW4tb25lLWFhYWFhYWFh', 'token-one-aaaaaaaa']) {
        const res = await post(mcp, initMsg(), { authorization: auth });
        assert.equal(res.status, 401, auth);
        assert.match(String(res.headers['www-authenticate']), /^Bearer\b/);
      }
      const query = await post(`${mcp}?access_token=token-one-aaaaaaaa`, initMsg());
      assert.equal(query.status, 401, 'tokens in the query string are not accepted');
    });

    it('each configured token passes', async () => {
      for (const tok of ['token-one-aaaaaaaa', 'token-two-bbbbbbbb']) {
        const res = await post(mcp, initMsg(), { accept: 'application/json', authorization: `Bearer ${tok}` });
        assert.equal(res.status, 200, `${tok}: ${res.text}`);
      }
    });

    it('SDK clients with a bearer token work over both transports', { timeout: 20_000 }, async () => {
      for (const kind of ['mcp', 'sse'] as const) {
        const client = await h.client('fix', kind, { authorization: 'Bearer token-two-bbbbbbbb' });
        assert.equal(textOf(await client.callTool({ name: 'do', arguments: { what: 'echo', text: kind } })), kind);
      }
    });

    it('legacy /messages POSTs need the token too', async () => {
      const stream = await openSse(`${h.url}/fix/sse`, { authorization: 'Bearer token-one-aaaaaaaa' });
      try {
        const ep = await stream.next((e) => e.event === 'endpoint', 5_000, 'endpoint');
        const res = await post(`${h.url}${ep.data}`, initMsg(1, '2024-11-05'));
        assert.equal(res.status, 401);
        const ok = await post(`${h.url}${ep.data}`, initMsg(2, '2024-11-05'), { authorization: 'Bearer token-one-aaaaaaaa' });
        assert.equal(ok.status, 202);
      } finally {
        stream.close();
      }
    });

    it('/healthz and /readyz need no token, but server states are shown only to an authorized caller (README)', async () => {
      assert.equal((await request(`${h.url}/healthz`)).status, 200);
      const anon = await request(`${h.url}/readyz`);
      assert.equal(anon.status, 200);
      assert.ok(!anon.text.includes('fix'), `server names hidden: ${anon.text}`);
      const authed = await request(`${h.url}/readyz`, { headers: { authorization: 'Bearer token-one-aaaaaaaa' } });
      assert.equal(authed.status, 200);
      assert.equal(JSON.parse(authed.text).servers.fix.state, 'ready');
    });

    it('an allowedOrigins entry is accepted, others still → 403', async () => {
      const auth = { accept: 'application/json', authorization: 'Bearer token-one-aaaaaaaa' };
      assert.equal((await post(mcp, initMsg(), { ...auth, origin: 'https://app.example.org' })).status, 200);
      assert.equal((await post(mcp, initMsg(), { ...auth, origin: 'https://claude.ai' })).status, 200);
      assert.equal((await post(mcp, initMsg(), { ...auth, origin: 'https://other.example.org' })).status, 403);
    });
  });

  // Verified red on a copy of proxy.ts without originAllowed()'s `if (proxy.tokens.length === 0) return false`:
  // the rebinding request gets 200 and a session.
  it('originAllowed() on a non-loopback bind: without tokens an Origin matching Host → 403 (DNS rebinding); with a token it is the own origin', { timeout: 20_000 }, async (t) => {
    const open = await harness(t, { servers: [fixture('fix')] }, { host: '0.0.0.0', allowUnauthenticated: true, limits: FAST });
    await open.proxy.ready(10_000);
    const openHost = `evil.example:${open.proxy.port}`;
    const openMcp = `http://127.0.0.1:${open.proxy.port}/fix/mcp`;
    const rebound = await post(openMcp, initMsg(), { accept: 'application/json', host: openHost, origin: `http://${openHost}` });
    assert.equal(rebound.status, 403, rebound.text);
    assert.equal(rebound.headers['mcp-session-id'], undefined);
    assert.equal((await post(openMcp, initMsg(), { accept: 'application/json', host: openHost })).status, 200, 'the same Host without an Origin is served');
    const token = 'token-rebind-cccccccc';
    const authed = await harness(t, { servers: [fixture('fix')] }, { host: '0.0.0.0', tokens: [token], limits: FAST });
    await authed.proxy.ready(10_000);
    const host = `proxy.example:${authed.proxy.port}`;
    const authedMcp = `http://127.0.0.1:${authed.proxy.port}/fix/mcp`;
    const headers = { accept: 'application/json', host, authorization: `Bearer ${token}` };
    const own = await post(authedMcp, initMsg(), { ...headers, origin: `http://${host}` });
    assert.equal(own.status, 200, own.text);
    assert.equal(typeof own.headers['mcp-session-id'], 'string');
    assert.equal((await post(authedMcp, initMsg(), { ...headers, origin: 'http://other.example' })).status, 403, 'another origin still → 403');
  });

  it('corsOrigins: a listed origin gets CORS headers that expose Mcp-Session-Id; others get none', { timeout: 20_000 }, async (t) => {
    const origin = 'https://app.example.org';
    const h = await harness(t, { servers: [fixture('fix')] }, { allowedOrigins: [origin], corsOrigins: [origin], limits: FAST });
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const pre = await request(mcp, {
      method: 'OPTIONS',
      headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type, mcp-session-id, mcp-protocol-version' },
    });
    assert.equal(pre.status, 204);
    assert.equal(pre.headers['access-control-allow-origin'], origin);
    const res = await post(mcp, initMsg(), { accept: 'application/json', origin });
    assert.equal(res.status, 200);
    assert.equal(res.headers['access-control-allow-origin'], origin);
    assert.match(String(res.headers['access-control-expose-headers']), /mcp-session-id/i);
    const other = await post(mcp, initMsg(), { accept: 'application/json', origin: 'https://claude.ai' });
    assert.equal(other.status, 200);
    assert.equal(other.headers['access-control-allow-origin'], undefined);
  });

  it('closing a legacy /sse stream ends its session (no session left behind)', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    assert.equal(h.proxy.status().fix!.sessions, 0);
    const stream = await openSse(`${h.url}/fix/sse`);
    const ep = await stream.next((e) => e.event === 'endpoint', 5_000, 'endpoint');
    assert.equal(h.proxy.status().fix!.sessions, 1);
    stream.close();
    await waitFor(() => h.proxy.status().fix!.sessions === 0, 5_000, 'session removed after the stream closed');
    assert.equal((await post(`${h.url}${ep.data}`, ping(1))).status, 404);
  });

  it('sseKeepaliveMs: open /sse and GET /mcp streams carry keepalive comments', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, sseKeepaliveMs: 50 } });
    await h.proxy.ready(10_000);
    const legacy = await openSse(`${h.url}/fix/sse`);
    const sid = await rawSession(h.url, 'fix');
    const get = await openSse(`${h.url}/fix/mcp`, { 'mcp-session-id': sid });
    try {
      await waitFor(() => legacy.comments >= 2 && get.comments >= 2, 5_000, 'keepalive comments on both streams');
      assert.equal(get.res.headers['x-accel-buffering'], 'no');
    } finally {
      legacy.close();
      get.close();
    }
  });

  it('maxQueuedBytesPerConnection: a stream whose reader stops reading is closed instead of buffering without bound', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, maxQueuedBytesPerConnection: 64 * 1024 } });
    await h.proxy.ready(10_000);
    const stream = await openSse(`${h.url}/fix/sse`);
    const ep = await stream.next((e) => e.event === 'endpoint', 5_000, 'endpoint');
    const endpoint = `${h.url}${ep.data}`;
    assert.equal((await post(endpoint, initMsg(0, '2024-11-05'))).status, 202);
    await stream.next((e) => e.event === 'message', 5_000, 'initialize result');
    stream.res.pause(); // the client stops reading; kernel buffers fill, then the proxy's queue
    // 40 answers of 500 KB (20 MB) cannot all sit in loopback socket buffers.
    for (let i = 1; i <= 40; i++) {
      const res = await post(endpoint, call(i, { what: 'line', bytes: 500_000 }));
      if (res.status === 404) break; // the session went away with its stream
      assert.equal(res.status, 202);
    }
    await waitFor(async () => (await post(endpoint, ping(99))).status === 404, 10_000, 'overflowing stream closed and its session ended');
    stream.close();
  });

  // A reading client must get any message the framer accepts (up to maxLineBytes = 10 MiB), even one larger than
  // maxQueuedBytesPerConnection (4 MiB): that limit is for clients that stop reading, not for big answers.
  const BIG_BYTES = 6 * 1024 * 1024;
  it('a 6 MiB tool result (> maxQueuedBytesPerConnection, < maxLineBytes) reaches a Streamable HTTP client as JSON', { timeout: 60_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const client = await h.client('fix', 'mcp');
    const r = await within(client.callTool({ name: 'do', arguments: { what: 'line', bytes: BIG_BYTES } }), 10_000, 'big result');
    assert.ok(textOf(r).length > BIG_BYTES - 200);
  });

  it('a 6 MiB tool result reaches a Streamable HTTP client that asked for an SSE response', { timeout: 60_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const sid = await rawSession(h.url, 'fix');
    const res = await within(
      post(`${h.url}/fix/mcp`, call(1, { what: 'line', bytes: BIG_BYTES }), sessionHeaders(sid, { accept: 'text/event-stream' })),
      10_000,
      'big result',
    );
    assert.equal(res.status, 200);
    assert.match(String(res.headers['content-type']), /^text\/event-stream/);
    const msgs = messages(res);
    assert.equal(msgs.length, 1, 'the answer arrived on the stream');
    assert.ok(textOf(msgs[0].result).length > BIG_BYTES - 200);
  });

  it('a 6 MiB tool result reaches a legacy SSE client', { timeout: 60_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const client = await h.client('fix', 'sse');
    const r = await within(client.callTool({ name: 'do', arguments: { what: 'line', bytes: BIG_BYTES } }), 10_000, 'big result');
    assert.ok(textOf(r).length > BIG_BYTES - 200);
  });

  it('maxBodyBytes: a body of limit - 1 and limit bytes is read, limit + 1 → 413, and the session still works', { timeout: 20_000 }, async (t) => {
    const limit = 1024;
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, maxBodyBytes: limit } });
    await h.proxy.ready(10_000);
    const sid = await rawSession(h.url, 'fix');
    const mcp = `${h.url}/fix/mcp`;
    const padded = (id: number, bytes: number) => {
      const base = JSON.stringify(call(id, { what: 'echo', text: '' }));
      const body = JSON.stringify(call(id, { what: 'echo', text: 'p'.repeat(bytes - base.length) }));
      assert.equal(Buffer.byteLength(body), bytes);
      return body;
    };
    for (const bytes of [limit - 1, limit]) {
      const res = await post(mcp, padded(bytes, bytes), sessionHeaders(sid));
      assert.equal(res.status, 200, `${bytes} bytes: ${res.text}`);
      assert.equal(onlyMessage(res).id, bytes);
    }
    assertRpcError(await post(mcp, padded(1, limit + 1), sessionHeaders(sid)), 413, -32600);
    assertRpcError(await post(mcp, padded(2, limit * 64), sessionHeaders(sid)), 413, -32600);
    const next = await post(mcp, call(3, { what: 'echo', text: 'fine' }), sessionHeaders(sid));
    assert.equal(textOf(onlyMessage(next).result), 'fine');
    // The legacy POST endpoint has the same limit.
    const stream = await openSse(`${h.url}/fix/sse`);
    try {
      const ep = await stream.next((e) => e.event === 'endpoint', 5_000, 'endpoint');
      assert.equal((await post(`${h.url}${ep.data}`, padded(4, limit))).status, 202);
      assertRpcError(await post(`${h.url}${ep.data}`, padded(5, limit + 1)), 413, -32600);
    } finally {
      stream.close();
    }
  });

  it('maxBatchSize: batches of limit - 1 and limit are answered, limit + 1 → 400 -32600', { timeout: 20_000 }, async (t) => {
    const limit = 5;
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, maxBatchSize: limit } });
    await h.proxy.ready(10_000);
    // Batches exist in 2025-03-26 (removed in 2025-06-18), so negotiate that version.
    const sid = await rawSession(h.url, 'fix', '2025-03-26');
    const mcp = `${h.url}/fix/mcp`;
    const headers = { accept: 'application/json', 'mcp-session-id': sid, 'mcp-protocol-version': '2025-03-26' };
    for (const n of [limit - 1, limit]) {
      const batch = Array.from({ length: n }, (_, i) => call(`b${n}-${i}`, { what: 'echo', text: `item ${i}` }));
      const res = await post(mcp, batch, headers);
      assert.equal(res.status, 200, `batch of ${n}: ${res.text}`);
      const answers = messages(res);
      assert.equal(answers.length, n);
      for (let i = 0; i < n; i++) {
        const a = answers.find((m) => m.id === `b${n}-${i}`);
        assert.ok(a, `answer for b${n}-${i}`);
        assert.equal(textOf(a.result), `item ${i}`);
      }
    }
    const tooMany = Array.from({ length: limit + 1 }, (_, i) => ping(i));
    assertRpcError(await post(mcp, tooMany, headers), 400, -32600);
    const next = await post(mcp, ping(77), headers);
    assert.deepEqual(onlyMessage(next), { jsonrpc: '2.0', id: 77, result: {} });
  });

  // Verified red on a copy of proxy.ts without the subscriptionRefusal() check in forwardRequest(): the over-count
  // and over-length subscribes are forwarded and answered with a result.
  it('maxSubscriptionsPerSession and maxSubscriptionUriChars: under and at are subscribed, over → -32000; the session keeps working', { timeout: 20_000 }, async (t) => {
    const maxSubs = 3;
    const maxChars = 40;
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, maxSubscriptionsPerSession: maxSubs, maxSubscriptionUriChars: maxChars } });
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const rpc = async (sid: string, id: number, method: string, uri: string) =>
      onlyMessage(await post(mcp, { jsonrpc: '2.0', id, method, params: { uri } }, sessionHeaders(sid)));
    const a = await rawSession(h.url, 'fix');
    for (let i = 1; i <= maxSubs; i++) assert.deepEqual(await rpc(a, i, 'resources/subscribe', `fix://r/${i}`), { jsonrpc: '2.0', id: i, result: {} }, `subscription ${i}`);
    const tooMany = await rpc(a, 10, 'resources/subscribe', 'fix://r/4');
    assert.equal(tooMany.id, 10);
    assert.equal(tooMany.error?.code, -32000, JSON.stringify(tooMany));
    assert.match(tooMany.error.message, /too many subscriptions/i);
    assert.deepEqual((await rpc(a, 11, 'resources/subscribe', 'fix://r/1')).result, {}, 'a URI the session already holds is not one more');
    assert.deepEqual((await rpc(a, 12, 'resources/unsubscribe', 'fix://r/2')).result, {});
    assert.deepEqual((await rpc(a, 13, 'resources/subscribe', 'fix://r/4')).result, {}, 'an unsubscribe makes room');
    assert.deepEqual(onlyMessage(await post(mcp, ping(14), sessionHeaders(a))), { jsonrpc: '2.0', id: 14, result: {} });
    // URI length, in a fresh session so the count limit is not what refuses.
    const b = await rawSession(h.url, 'fix');
    const uri = (chars: number) => `fix://${'u'.repeat(chars - 'fix://'.length)}`;
    assert.deepEqual((await rpc(b, 20, 'resources/subscribe', uri(maxChars - 1))).result, {}, 'under');
    assert.deepEqual((await rpc(b, 21, 'resources/subscribe', uri(maxChars))).result, {}, 'at');
    const tooLong = await rpc(b, 22, 'resources/subscribe', uri(maxChars + 1));
    assert.equal(tooLong.id, 22);
    assert.equal(tooLong.error?.code, -32000, JSON.stringify(tooLong));
    assert.match(tooLong.error.message, /too long/i);
    assert.deepEqual(onlyMessage(await post(mcp, ping(23), sessionHeaders(b))), { jsonrpc: '2.0', id: 23, result: {} });
  });

  it('maxSessionsPerServer: sessions up to the limit open; one over evicts the least recently active idle one', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, maxSessionsPerServer: 2 } });
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const a = await rawSession(h.url, 'fix'); // under
    const b = await rawSession(h.url, 'fix'); // at
    assert.equal(h.proxy.status().fix!.sessions, 2);
    assert.equal((await post(mcp, ping(1), sessionHeaders(a))).status, 200); // a is now more recently active than b
    const c = await rawSession(h.url, 'fix'); // over → b evicted
    assert.equal(h.proxy.status().fix!.sessions, 2);
    assertRpcError(await post(mcp, ping(2), sessionHeaders(b)), 404, -32001);
    assert.equal((await post(mcp, ping(3), sessionHeaders(a))).status, 200);
    assert.equal((await post(mcp, ping(4), sessionHeaders(c))).status, 200);
  });

  it('maxSessionsPerServer: when no session is evictable a new one → 503 with Retry-After', { timeout: 20_000 }, async (t) => {
    const log = path.join(tmpDir('log'), 'fixture.log');
    const h = await harness(t, { servers: [fixture('fix', 'ok', { env: { FIXTURE_LOG: log } })] }, {
      limits: { ...FAST, maxSessionsPerServer: 2, retryAfterS: 7 },
    });
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const a = await rawSession(h.url, 'fix');
    const b = await rawSession(h.url, 'fix');
    // Both sessions have a request in flight at the child, so neither is idle.
    for (const [i, sid] of [a, b].entries()) void post(mcp, call(i, { what: 'hang' }), sessionHeaders(sid)).catch(() => null);
    const hangs = () => (fs.existsSync(log) ? fs.readFileSync(log, 'utf8').split('\n').filter((l) => l.startsWith('hang')).length : 0);
    await waitFor(() => hangs() === 2, 5_000, 'both requests reach the child');
    const res = await post(mcp, initMsg(), { accept: 'application/json' });
    assertRpcError(res, 503, -32000);
    assert.equal(res.headers['retry-after'], '7');
    assert.equal(h.proxy.status().fix!.sessions, 2, 'no session was evicted');
  });

  it('maxPendingPerSession: limit requests may be in flight, one more → 429 -32000 for that request', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, maxPendingPerSession: 2 } });
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const sid = await rawSession(h.url, 'fix');
    const other = await h.client('fix', 'mcp');
    const hungCount = async () => JSON.parse(textOf(await other.callTool({ name: 'do', arguments: { what: 'seen' } }))).hung.length as number;
    const inflight = [1, 2].map((id) => post(mcp, call(id, { what: 'hang' }), sessionHeaders(sid)).catch(() => null));
    await waitFor(async () => (await hungCount()) === 2, 5_000, 'both requests (under and at the limit) reach the child');
    const over = await post(mcp, call(3, { what: 'echo', text: 'x' }), sessionHeaders(sid));
    const body = assertRpcError(over, 429, -32000);
    assert.equal(body.id, 3, 'the error answers that request');
    // Another session is unaffected by this session's limit.
    assert.equal(textOf(await other.callTool({ name: 'do', arguments: { what: 'echo', text: 'other' } })), 'other');
    void inflight;
  });

  it('requestTimeoutMs: a request the child never answers gets REQUEST_TIMEOUT (-32003) "Request timed out"; the session stays usable', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, requestTimeoutMs: 300, sweepIntervalMs: 50 } });
    await h.proxy.ready(10_000);
    const client = await h.client('fix', 'mcp');
    const err = await within(client.callTool({ name: 'do', arguments: { what: 'hang' } }).then(() => null, (e: unknown) => e), 10_000, 'hanging call');
    isMcpError(-32003, 'Request timed out')(err);
    assert.equal(textOf(await client.callTool({ name: 'do', arguments: { what: 'echo', text: 'ok' } })), 'ok');
  });

  it('sessionIdleMs: an idle session expires and then → 404', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, sessionIdleMs: 200, sweepIntervalMs: 50 } });
    await h.proxy.ready(10_000);
    const sid = await rawSession(h.url, 'fix');
    assert.equal(h.proxy.status().fix!.sessions, 1);
    await waitFor(() => h.proxy.status().fix!.sessions === 0, 5_000, 'idle session to be swept');
    assertRpcError(await post(`${h.url}/fix/mcp`, ping(1), sessionHeaders(sid)), 404, -32001);
  });

  it('per-session mode: ending a session with several requests in flight cancels every one on its child before stdin closes', { timeout: 30_000 }, async (t) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rmp-cancel-'));
    t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
    const fixtureLog = path.join(dir, 'fixture.log');
    const h = await harness(t, { servers: [fixture('solo', 'ok', { sessions: 'per-session', env: { FIXTURE_LOG: fixtureLog } })] }, { limits: FAST });
    const mcp = `${h.url}/solo/mcp`;
    const sid = await rawSession(h.url, 'solo');
    // Three at once: with more than one in flight, messages to the child are queued for the end of the turn.
    const waiting = [1, 2, 3].map((n) => post(mcp, call(`hang-${n}`, { what: 'hang' }), sessionHeaders(sid)));
    const hung = await waitFor(() => {
      const ids = fileLines(fixtureLog).filter((l) => l.startsWith('hang ')).map((l) => l.slice(5));
      return ids.length === 3 ? ids : null;
    }, 10_000, 'the child to receive three hanging requests');
    const del = await request(mcp, { method: 'DELETE', headers: { 'mcp-session-id': sid } });
    assert.equal(del.status, 200, del.text);
    for (const res of await Promise.all(waiting)) assert.deepEqual(onlyMessage(res).error, { code: -32004, message: 'Session ended' }, res.text);
    await waitFor(() => {
      const cancelled = fileLines(fixtureLog).filter((l) => l.startsWith('cancelled ')).map((l) => l.slice(10));
      return hung.every((id) => cancelled.includes(id)) || null;
    }, 10_000, 'the child to see notifications/cancelled for all three before it exits');
  });

  it('per-session mode: one child per session up to maxChildrenPerServer, one over → 503', { timeout: 30_000 }, async (t) => {
    const pidFile = path.join(tmpDir('pid'), 'pids');
    const h = await startHarness(
      { servers: [fixture('solo', 'ok', { sessions: 'per-session', env: { FIXTURE_PIDFILE: pidFile } })] },
      { limits: { ...FAST, maxChildrenPerServer: 2 } },
    );
    t.after(() => {
      // Children of per-session servers may not show in status(); the pid file names them all.
      for (const line of fs.existsSync(pidFile) ? fs.readFileSync(pidFile, 'utf8').split('\n') : []) if (line) h.groups.add(Number(line));
      return h.stop();
    });
    await h.proxy.ready(10_000);
    const c1 = await h.client('solo', 'mcp'); // under
    const c2 = await h.client('solo', 'mcp'); // at
    const pid1 = textOf(await c1.callTool({ name: 'do', arguments: { what: 'pid' } }));
    const pid2 = textOf(await c2.callTool({ name: 'do', arguments: { what: 'pid' } }));
    h.groups.add(Number(pid1));
    h.groups.add(Number(pid2));
    assert.notEqual(pid1, pid2, 'each session has its own child');
    // Over: a request in flight on each session keeps both busy (not idle), so none gives way. (Relying on the
    // SDK's standalone GET stream would race: the SDK opens it without waiting.)
    const hung = [c1, c2].map((c) => c.callTool({ name: 'do', arguments: { what: 'hang' } }).catch(() => null));
    for (const c of [c1, c2]) {
      await waitFor(async () => JSON.parse(textOf(await c.callTool({ name: 'do', arguments: { what: 'seen' } }))).hung.length === 1, 5_000, 'a request hanging on each session');
    }
    void hung;
    const res = await post(`${h.url}/solo/mcp`, initMsg(), { accept: 'application/json' });
    assertRpcError(res, 503, -32000);
    assert.equal(res.headers['retry-after'], String(DEFAULT_LIMITS.retryAfterS), 'Retry-After on 503');
    // Ending a session stops its child (whole group) and frees the slot.
    await (c1.transport as StreamableHTTPClientTransport).terminateSession();
    await waitFor(() => liveGroupMembers(Number(pid1)).length === 0, GONE_BOUND_MS, 'child of the deleted session gone');
    // The slot is released once the stop sequence finishes, a moment after the group is gone: poll with a bound.
    const sid3 = await waitFor(async () => {
      const r = await post(`${h.url}/solo/mcp`, initMsg(), { accept: 'application/json' });
      return r.status === 200 ? String(r.headers['mcp-session-id']) : null;
    }, 5_000, 'a new per-session child once the slot is free');
    const pid3 = textOf(onlyMessage(await post(`${h.url}/solo/mcp`, call(1, { what: 'pid' }), sessionHeaders(sid3))).result);
    h.groups.add(Number(pid3));
    assert.ok(![pid1, pid2].includes(pid3), 'the new session got a new child');
  });

  // Verified red on a copy of proxy.ts whose createSession() refuses at maxChildrenPerServer without
  // evictIdleSession(): the third initialize → 503 although both sessions are idle.
  it('per-session mode: at maxChildrenPerServer a new session ends the least recently active one with nothing in flight (its child stops, even with a stream open); none → 503', { timeout: 30_000 }, async (t) => {
    const dir = tmpDir('pid');
    const pidFile = path.join(dir, 'pids');
    const fixtureLog = path.join(dir, 'fixture.log');
    const h = await startHarness(
      { servers: [fixture('solo', 'ok', { sessions: 'per-session', env: { FIXTURE_PIDFILE: pidFile, FIXTURE_LOG: fixtureLog } })] },
      { limits: { ...FAST, maxChildrenPerServer: 2, retryAfterS: 6 } },
    );
    t.after(() => {
      for (const line of fileLines(pidFile)) h.groups.add(Number(line));
      return h.stop();
    });
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/solo/mcp`;
    const pidOf = async (sid: string, id: number) => Number(textOf(onlyMessage(await post(mcp, call(id, { what: 'pid' }), sessionHeaders(sid))).result));
    const a = await rawSession(h.url, 'solo');
    const pidA = await pidOf(a, 1);
    const b = await rawSession(h.url, 'solo'); // at the limit
    const pidB = await pidOf(b, 2);
    assert.equal((await post(mcp, ping(3), sessionHeaders(a))).status, 200); // b is now the least recently active
    // Both are idle (JSON answers, no stream, nothing in flight): one more ends b instead of a 503.
    const c = await rawSession(h.url, 'solo');
    assertRpcError(await post(mcp, ping(4), sessionHeaders(b)), 404, -32001);
    await waitFor(() => liveGroupMembers(pidB).length === 0, GONE_BOUND_MS, 'the child of the ended session gone');
    assert.equal(await pidOf(a, 5), pidA, 'a keeps its child');
    const pidC = await pidOf(c, 6);
    assert.ok(![pidA, pidB].includes(pidC), 'c got a child of its own');
    assert.equal(h.proxy.status().solo!.sessions, 2);
    // a has a request in flight at its child; c has only an open GET stream, which does not hold its child
    // (idle /sse streams used to hold every per-session child for good).
    void post(mcp, call(7, { what: 'hang' }), sessionHeaders(a)).catch(() => null);
    await waitFor(() => fileLines(fixtureLog).filter((l) => l.startsWith('hang')).length === 1, 5_000, "a's request reaches its child");
    const stream = await openSse(mcp, { 'mcp-session-id': c });
    assert.equal(stream.res.statusCode, 200);
    const d = await rawSession(h.url, 'solo');
    await waitFor(() => stream.ended, 5_000, "c's stream ended");
    assertRpcError(await post(mcp, ping(8), sessionHeaders(c)), 404, -32001);
    await waitFor(() => liveGroupMembers(pidC).length === 0, GONE_BOUND_MS, "c's child gone");
    // Now both a and d have a request in flight: nothing can give way.
    void post(mcp, call(9, { what: 'hang' }), sessionHeaders(d)).catch(() => null);
    await waitFor(() => fileLines(fixtureLog).filter((l) => l.startsWith('hang')).length === 2, 5_000, "d's request reaches its child");
    const res = await post(mcp, initMsg(), { accept: 'application/json' });
    assertRpcError(res, 503, -32000);
    assert.equal(res.headers['retry-after'], '6');
    assert.equal(h.proxy.status().solo!.sessions, 2, 'no session was ended');
    assert.equal(await pidOf(a, 10), pidA);
  });

  it('maxChildQueueBytes: a child that stops reading stdin makes requests fail with -32000 instead of buffering', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix', 'stall')] }, { limits: { ...FAST, maxChildQueueBytes: 256 * 1024, requestTimeoutMs: 20_000 } });
    await h.proxy.ready(10_000);
    const sid = await rawSession(h.url, 'fix');
    const mcp = `${h.url}/fix/mcp`;
    const chunk = 'q'.repeat(100 * 1024);
    // The pipe holds ~64 KiB and the queue 256 KiB, so of 12 requests of 100 KiB some must be refused.
    const settled: (RawResponse | null)[] = [];
    for (let i = 0; i < 12; i++) {
      void post(mcp, call(i, { what: 'echo', text: chunk }), sessionHeaders(sid)).then(
        (r) => settled.push(r),
        () => settled.push(null),
      );
    }
    const refusedWith = (r: RawResponse | null) => (r ? messages(r)[0]?.error?.code : undefined);
    await waitFor(() => settled.some((r) => refusedWith(r) === -32000), 10_000, 'a request refused with -32000');
    const seen = () => settled.map((r) => (r ? (messages(r)[0]?.error?.message ?? 'answered') : 'transport error'));
    assert.ok(settled.length < 12, `requests that fit in the queue are still waiting for the child, not refused: ${seen()}`);
    assert.ok(settled.every((r) => refusedWith(r) === -32000), `the stalled child answered nothing: ${seen()}`);
  });

  // ── Hostile input and edges of the HTTP layer ──

  // Regression: a body nested 5,000 deep (10 KB) made JSON.stringify throw and the proxy exit.
  it('maxJsonDepth: client messages nested under and at the limit are forwarded; deeper → 400 -32600 "nested" (Streamable requests and notifications, legacy POSTs), 5,000 deep too', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, maxJsonDepth: 16 } });
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const sid = await rawSession(h.url, 'fix');
    // A call is {…,"params":{…,"arguments":{…,"deep":[[…]]}}}: depth 3 + arrays. A notification: 2 + arrays.
    const deepCall = (id: string, arrays: number) =>
      `{"jsonrpc":"2.0","id":${JSON.stringify(id)},"method":"tools/call","params":{"name":"do","arguments":{"what":"echo","text":"${id}","deep":${nestedArrays(arrays)}}}}`;
    const deepNote = (arrays: number) => `{"jsonrpc":"2.0","method":"notifications/deep","params":{"deep":${nestedArrays(arrays)}}}`;
    const refused = (res: RawResponse) => assert.match(assertRpcError(res, 400, -32600).error.message, /nested/);
    for (const [id, arrays] of [['under', 12], ['at', 13]] as const) {
      assert.equal(textOf(onlyMessage(await post(mcp, deepCall(id, arrays), sessionHeaders(sid))).result), id);
    }
    refused(await within(post(mcp, deepCall('over', 14), sessionHeaders(sid)), 5_000, 'one over'));
    refused(await within(post(mcp, deepCall('deep', 5_000), sessionHeaders(sid)), 5_000, '5,000 deep'));
    assert.equal((await post(mcp, deepNote(14), sessionHeaders(sid))).status, 202, 'a notification at the limit');
    refused(await within(post(mcp, deepNote(15), sessionHeaders(sid)), 5_000, 'a notification one over'));
    refused(await within(post(mcp, deepNote(5_000), sessionHeaders(sid)), 5_000, 'a notification 5,000 deep'));
    const legacy = await legacySession(h.url, 'fix');
    try {
      assert.equal((await legacy.send(deepCall('legacy-at', 13))).status, 202);
      assert.equal(textOf((await legacy.answer('legacy-at')).result), 'legacy-at');
      refused(await within(legacy.send(deepCall('legacy-over', 14)), 5_000, 'legacy one over'));
      refused(await within(legacy.send(deepCall('legacy-deep', 5_000)), 5_000, 'legacy 5,000 deep'));
      refused(await within(legacy.send(deepNote(5_000)), 5_000, 'legacy notification 5,000 deep'));
    } finally {
      legacy.stream.close();
    }
    assert.equal(textOf(onlyMessage(await post(mcp, call('after', { what: 'echo', text: 'alive' }), sessionHeaders(sid))).result), 'alive');
    assert.equal((await request(`${h.url}/healthz`)).status, 200);
  });

  // Regression: an error boundary around every request.
  it('an unexpected throw while handling an HTTP request → 500 -32603 "Internal error", logged at error; the proxy goes on', { timeout: 20_000 }, async (t) => {
    const lines: string[] = [];
    const faulty = faultyLog(lines);
    const h = await harness(t, { servers: [fixture('fix')] }, { log: faulty.log, limits: FAST });
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const sid = await rawSession(h.url, 'fix');
    // A client response to a request the child never sent is logged and dropped: the failure is injected there.
    const stray = (id: string) => ({ jsonrpc: '2.0', id, result: {} });
    const from = lines.length;
    assert.equal((await post(mcp, stray('nobody-asked-1'), sessionHeaders(sid))).status, 202);
    assert.ok(lines.slice(from).some((l) => l.includes('[fix]')), `precondition: a stray client response is logged (log: ${lines.slice(from).join(' | ')})`);
    faulty.arm((_level, scope) => scope === 'fix');
    const res = await within(post(mcp, stray('nobody-asked-2'), sessionHeaders(sid)), 5_000, 'the POST whose handling threw');
    assert.ok(faulty.fired());
    assert.equal(assertRpcError(res, 500, -32603).error.message, 'Internal error');
    assert.ok(lines.some((l) => l.startsWith('error ') && /injected log failure/.test(l)), `the throw logged at error (log: ${lines.slice(from).join(' | ')})`);
    assert.equal(textOf(onlyMessage(await post(mcp, call('after', { what: 'echo', text: 'alive' }), sessionHeaders(sid))).result), 'alive');
    assert.equal((await request(`${h.url}/healthz`)).status, 200);
  });

  /** Opens a connection, reads one keep-alive answer to GET /healthz on it, and leaves it open. */
  async function heldConnection(port: number): Promise<net.Socket> {
    const socket = await idleConnection(port);
    let got = '';
    socket.setEncoding('latin1');
    socket.write('GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
    await within(new Promise<void>((resolve) => socket.on('data', (chunk: string) => {
      got += chunk;
      if (/\r\n\r\n\{"status":"ok"\}$/.test(got)) resolve();
    })), 5_000, 'a kept-alive /healthz answer');
    assert.match(got, /^HTTP\/1\.1 200 /);
    return socket;
  }

  // Regression: idle connections without a token exhausted descriptors; a child restart then hit EMFILE.
  it('maxConnections: connections under and at the limit are served; one over gets a raw 503 (-32000, Connection: close) before its body is read', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, maxConnections: 3, keepAliveTimeoutMs: 60_000 } });
    await h.proxy.ready(10_000);
    const held: net.Socket[] = [];
    t.after(() => held.forEach((socket) => socket.destroy()));
    for (let i = 0; i < 3; i++) held.push(await heldConnection(h.proxy.port)); // under, under, at
    // Headers announce a body that never comes: the answer must not wait for it.
    const over = await rawHttp(h.proxy.port, 'POST /fix/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n', 5_000);
    assert.equal(over.status, 503, over.raw.slice(0, 300));
    assert.equal(over.headers.connection, 'close');
    assert.equal(JSON.parse(over.body).error.code, -32000);
    held.pop()!.destroy();
    await waitFor(async () => (await rawHttp(h.proxy.port, 'GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n')).status === 200, 5_000, 'a closed connection makes room');
  });

  /** Raw POSTs whose answers are never read (paused sockets); resume() reads the rest and reports what came. */
  async function unreadPosts(port: number, bodies: string[], sid: string) {
    const sockets = await Promise.all(bodies.map(async (body) => {
      const socket = await idleConnection(port);
      socket.pause();
      socket.write(`POST /fix/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json\r\nMcp-Session-Id: ${sid}\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
      return socket;
    }));
    const resume = () => Promise.all(sockets.map((socket) => new Promise<{ complete: boolean; bytes: number }>((resolve) => {
      const chunks: Buffer[] = [];
      let bytes = 0;
      const done = (complete: boolean) => {
        socket.destroy();
        resolve({ complete, bytes });
      };
      socket.on('data', (chunk: Buffer) => {
        chunks.push(chunk);
        bytes += chunk.length;
        const text = Buffer.concat(chunks).toString('latin1');
        const cut = text.indexOf('\r\n\r\n');
        const length = /content-length: (\d+)/i.exec(text.slice(0, cut))?.[1];
        if (cut !== -1 && length !== undefined && bytes >= cut + 4 + Number(length)) done(true);
      });
      socket.on('error', () => {});
      socket.on('close', () => done(false));
      socket.resume();
    })));
    return { sockets, resume };
  }
  const CLOSED_RE = /^warn \[.*\] .*closed a connection with (\d+) bytes unread/;

  // Regression: 80 unread 8 MB answers took RSS from 48 to 708 MiB.
  it('maxQueuedBytesTotal: JSON answers nobody reads are cut off once the total queued passes the limit (warn "closed a connection with N bytes unread"); readers are unaffected', { timeout: 60_000 }, async (t) => {
    const lines: string[] = [];
    const MIB = 1024 * 1024;
    const h = await harness(t, { servers: [fixture('fix')] }, { log: captureLog(lines), limits: { ...FAST, maxQueuedBytesTotal: 8 * MIB, requestTimeoutMs: 120_000 } });
    await h.proxy.ready(10_000);
    const sid = await rawSession(h.url, 'fix');
    // Three answers of 9 MiB: a loopback socket that is not read takes at most a few MiB of each.
    const posts = await unreadPosts(h.proxy.port, [1, 2, 3].map((i) => JSON.stringify(call(`big-${i}`, { what: 'line', bytes: 9 * MIB }))), sid);
    t.after(() => posts.sockets.forEach((socket) => socket.destroy()));
    await waitFor(() => lines.some((l) => CLOSED_RE.test(l)), 15_000, 'a connection closed for its backlog');
    const closed = lines.filter((l) => CLOSED_RE.test(l));
    for (const line of closed) assert.ok(Number(CLOSED_RE.exec(line)![1]) > 0, line);
    const outcomes = await within(posts.resume(), 30_000, 'the rest of each answer');
    const cut = outcomes.filter((o) => !o.complete).length;
    assert.ok(cut >= 1 && cut <= 3, JSON.stringify(outcomes));
    assert.equal(cut, lines.filter((l) => CLOSED_RE.test(l)).length, 'each cut connection is logged once');
    const reader = await h.client('fix', 'mcp');
    assert.equal(textOf(await reader.callTool({ name: 'do', arguments: { what: 'line', bytes: MIB } })).length > MIB - 200, true);
  });

  it('maxQueuedBytesPerConnection: a client that pipelines requests and reads none of the JSON answers is cut off at the next answer (logged)', { timeout: 60_000 }, async (t) => {
    const lines: string[] = [];
    const MIB = 1024 * 1024;
    const h = await harness(t, { servers: [fixture('fix')] }, { log: captureLog(lines), limits: { ...FAST, maxQueuedBytesPerConnection: 256 * 1024, requestTimeoutMs: 120_000 } });
    await h.proxy.ready(10_000);
    const sid = await rawSession(h.url, 'fix');
    const socket = await idleConnection(h.proxy.port);
    t.after(() => socket.destroy());
    socket.pause();
    // Three requests in one write, so all are parsed at once; each answer is 6 MiB, more than the kernel takes.
    socket.write([1, 2, 3].map((i) => {
      const body = JSON.stringify(call(`p${i}`, { what: 'line', bytes: 6 * MIB }));
      return `POST /fix/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json\r\nMcp-Session-Id: ${sid}\r\nContent-Length: ${body.length}\r\n\r\n${body}`;
    }).join(''));
    const closed = await waitFor(() => lines.find((l) => CLOSED_RE.test(l)), 15_000, 'the connection closed for its backlog');
    assert.match(closed, /maxQueuedBytesPerConnection/);
    assert.ok(Number(CLOSED_RE.exec(closed)![1]) > 256 * 1024, closed);
    let received = 0;
    socket.on('data', (chunk: Buffer) => (received += chunk.length));
    socket.on('error', () => {});
    const ended = new Promise((resolve) => socket.on('close', resolve));
    socket.resume();
    await within(ended, 10_000, 'the cut connection to close');
    assert.ok(received < 3 * 6 * MIB, `received ${received} bytes: not every answer`);
  });

  // Regression: fan-out of child output to 200 SSE streams that never read reached 982 MiB.
  it('maxQueuedBytesTotal: fan-out of child notifications to SSE streams nobody reads is cut off at the total, not only per stream', { timeout: 60_000 }, async (t) => {
    const lines: string[] = [];
    const MIB = 1024 * 1024;
    const h = await harness(t, { servers: [fixture('fix')] }, {
      log: captureLog(lines),
      // The per-connection bound is out of reach here: only the total can stop the growth.
      limits: { ...FAST, maxQueuedBytesPerConnection: 256 * MIB, maxQueuedBytesTotal: 8 * MIB, requestTimeoutMs: 120_000 },
    });
    await h.proxy.ready(10_000);
    const listeners = await Promise.all([1, 2, 3, 4].map(() => legacySession(h.url, 'fix')));
    t.after(() => listeners.forEach((l) => l.stream.close()));
    for (const l of listeners) l.stream.res.pause();
    assert.equal(h.proxy.status().fix!.sessions, 4);
    // The caller gets a JSON answer and has no stream, so the broadcast reaches only the four listeners.
    const sid = await rawSession(h.url, 'fix');
    const res = await within(post(`${h.url}/fix/mcp`, call('spam', { what: 'spam', count: 12, bytes: MIB }), sessionHeaders(sid)), 30_000, 'the spam call');
    assert.equal(textOf(onlyMessage(res).result), 'spammed');
    await waitFor(() => lines.some((l) => CLOSED_RE.test(l)), 10_000, 'a stream closed for its backlog');
    // A closed legacy stream ends its session.
    await waitFor(() => h.proxy.status().fix!.sessions < 5, 5_000, 'a listener session ended');
  });

  // Regression: eight concurrent 4 MiB batch bodies were parsed whole at once, stalling /healthz for 4.4 s.
  it('maxBodyBytesInFlight: bodies in flight together under and at the limit are read; one that would pass it → 503 -32000 with Retry-After; /healthz answers meanwhile', { timeout: 30_000 }, async (t) => {
    const KIB = 1024;
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, maxBodyBytes: 48 * KIB, maxBodyBytesInFlight: 64 * KIB, retryAfterS: 3 } });
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const sid = await rawSession(h.url, 'fix');
    const padded = (id: string, bytes: number) => {
      const base = JSON.stringify(call(id, { what: 'echo', text: '' }));
      return JSON.stringify(call(id, { what: 'echo', text: 'p'.repeat(bytes - base.length) }));
    };
    // A: 40 KiB announced, 39 KiB sent, the last KiB held back, so its body stays in flight.
    const bodyA = padded('a', 40 * KIB);
    const socketA = await idleConnection(h.proxy.port);
    t.after(() => socketA.destroy());
    let answerA = '';
    socketA.on('data', (chunk: Buffer) => (answerA += chunk.toString('latin1')));
    socketA.write(`POST /fix/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json\r\nMcp-Session-Id: ${sid}\r\nConnection: close\r\nContent-Length: ${bodyA.length}\r\n\r\n${bodyA.slice(0, 39 * KIB)}`);
    // Bytes count as they arrive (a socket that declares 4 MiB and sends nothing holds none), so with A's 39 KiB
    // in flight 25 KiB more is exactly at the limit. Over: 26 KiB, polled only until A's bytes are in (bounded).
    const over = await waitFor(async () => {
      const res = await post(mcp, padded('over', 26 * KIB), sessionHeaders(sid));
      return res.status === 503 ? res : null;
    }, 5_000, 'a body that would pass maxBodyBytesInFlight → 503');
    assertRpcError(over, 503, -32000);
    assert.equal(over.headers['retry-after'], '3');
    assert.equal(over.headers.connection, 'close');
    assert.equal((await request(`${h.url}/healthz`)).status, 200);
    for (const [id, bytes] of [['under', 24 * KIB], ['at', 25 * KIB]] as const) {
      const res = await post(mcp, padded(id, bytes), sessionHeaders(sid));
      assert.equal(res.status, 200, `${id}: ${res.text.slice(0, 200)}`);
      assert.equal(onlyMessage(res).id, id);
    }
    socketA.write(bodyA.slice(39 * KIB));
    await waitFor(() => /^HTTP\/1\.1 200 /.test(answerA) && answerA.includes('"id":"a"'), 5_000, "A's answer");
    assert.equal((await post(mcp, padded('after', 40 * KIB), sessionHeaders(sid))).status, 200, 'room again once A is read');
  });

  // Regression: Node drops headers past maxHeadersCount silently, so an Origin after 100 headers was not seen.
  it('maxHeadersCount: a request with 99 header fields is served; with 100 → 431 (-32000); an Origin after 150 headers is not let through', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const body = JSON.stringify(initMsg());
    const withFields = (count: number, origin?: string) => {
      const fields = ['Host: 127.0.0.1', 'Connection: close', 'Content-Type: application/json', 'Accept: application/json', `Content-Length: ${body.length}`];
      const last = origin === undefined ? [] : [`Origin: ${origin}`];
      for (let i = 0; fields.length + last.length < count; i++) fields.push(`X-Pad-${i}: ${i}`);
      return `POST /fix/mcp HTTP/1.1\r\n${[...fields, ...last].join('\r\n')}\r\n\r\n${body}`;
    };
    const under = await rawHttp(h.proxy.port, withFields(99));
    assert.equal(under.status, 200, under.raw.slice(0, 300));
    assert.equal(JSON.parse(under.body).result.serverInfo.name, 'fixture');
    assert.equal((await rawHttp(h.proxy.port, withFields(99, 'https://evil.example'))).status, 403, 'the 99th field is seen');
    for (const [count, origin] of [[100, undefined], [101, undefined], [150, 'https://evil.example']] as const) {
      const res = await rawHttp(h.proxy.port, withFields(count, origin));
      assert.equal(res.status, 431, `${count} fields: ${res.raw.slice(0, 200)}`);
      // Node 20 drops the fields past its count and the proxy answers 431 with a JSON-RPC body; Node 24 refuses
      // such a request itself with an empty 431. Either way it is refused.
      if (res.body !== '') assert.equal(JSON.parse(res.body).error.code, -32000);
      else assert.ok(Number(process.versions.node.split('.')[0]) >= 22, `an empty 431 body on Node ${process.version}`);
    }
  });

  // Regression: Node checks its timers every 30 s by default, so the README's 10 s and 60 s were about 30 s and 90 s.
  it('headersTimeoutMs and httpRequestTimeoutMs hold within connectionsCheckIntervalMs: idle, dribbled-header and dribbled-body connections close on time', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, headersTimeoutMs: 400, httpRequestTimeoutMs: 800, connectionsCheckIntervalMs: 50 } });
    await h.proxy.ready(10_000);
    const closesAfter = async (dribble: (socket: net.Socket) => NodeJS.Timeout | null): Promise<number> => {
      const socket = await idleConnection(h.proxy.port);
      const start = Date.now();
      const timer = dribble(socket);
      socket.on('error', () => {});
      socket.resume(); // read (and drop) the 408, so the end of the stream is seen
      try {
        await within(new Promise((resolve) => socket.on('close', resolve)), 5_000, 'the server to close the connection');
      } finally {
        if (timer) clearInterval(timer);
        socket.destroy();
      }
      return Date.now() - start;
    };
    const idle = await closesAfter(() => null);
    assert.ok(idle >= 200 && idle < 1_200, `idle connection closed after ${idle} ms (headersTimeoutMs 400)`);
    const headers = await closesAfter((socket) => {
      socket.write('POST /fix/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n');
      return setInterval(() => socket.write('X-Dribble: 1\r\n'), 100);
    });
    assert.ok(headers >= 200 && headers < 1_200, `dribbled headers closed after ${headers} ms (headersTimeoutMs 400)`);
    const body = await closesAfter((socket) => {
      socket.write('POST /fix/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{');
      return setInterval(() => socket.write(' '), 100);
    });
    assert.ok(body >= 500 && body < 1_800, `dribbled body closed after ${body} ms (httpRequestTimeoutMs 800)`);
  });

  // Regression: 16 idle legacy /sse connections from one token took all 16 per-session children for good.
  describe('maxChildrenPerCredential', () => {
    const tokenA = 'token-alpha-0123456789';
    const tokenB = 'token-bravo-0123456789';
    const authA = { authorization: `Bearer ${tokenA}` };
    const authB = { authorization: `Bearer ${tokenB}` };
    async function perCredential(t: TestContext) {
      const dir = tmpDir('cred');
      const pidFile = path.join(dir, 'pids');
      const log = path.join(dir, 'fixture.log');
      const h = await harness(t, { servers: [fixture('solo', 'ok', { sessions: 'per-session', env: { FIXTURE_PIDFILE: pidFile, FIXTURE_LOG: log } })] }, {
        tokens: [tokenA, tokenB], limits: { ...FAST, maxChildrenPerCredential: 2, maxChildrenPerServer: 8 },
      });
      t.after(() => {
        for (const line of fileLines(pidFile)) h.groups.add(Number(line));
      });
      return { h, log };
    }

    it('at the cap, the credential\'s least recently active session with nothing in flight gives way (its open stream ends, its child stops); other credentials keep theirs', { timeout: 40_000 }, async (t) => {
      const { h } = await perCredential(t);
      type Legacy = Awaited<ReturnType<typeof legacySession>>;
      const pidOf = async (s: Legacy, id: string) => {
        assert.equal((await s.send(call(id, { what: 'pid' }))).status, 202);
        return Number(textOf((await s.answer(id)).result));
      };
      const a1 = await legacySession(h.url, 'solo', {}, authA);
      const a2 = await legacySession(h.url, 'solo', {}, authA);
      const b1 = await legacySession(h.url, 'solo', {}, authB);
      t.after(() => [a1, a2, b1].forEach((s) => s.stream.close()));
      const p1 = await pidOf(a1, 'p1');
      const p2 = await pidOf(a2, 'p2');
      const pb = await pidOf(b1, 'pb');
      assert.equal(await pidOf(a1, 'p1-again'), p1); // a2 is now a's least recently active session
      const a3 = await legacySession(h.url, 'solo', {}, authA);
      t.after(() => a3.stream.close());
      await waitFor(() => a2.stream.ended, 5_000, "a2's stream ended");
      await waitFor(() => liveGroupMembers(p2).length === 0, GONE_BOUND_MS, "a2's child gone");
      assert.equal((await a2.send(ping('gone'))).status, 404);
      const p3 = await pidOf(a3, 'p3');
      assert.ok(![p1, p2, pb].includes(p3), 'a3 got a child of its own');
      assert.equal(await pidOf(a1, 'p1-last'), p1, 'a1 keeps its child');
      assert.equal(await pidOf(b1, 'pb-last'), pb, 'b keeps its child');
      assert.equal(a1.stream.ended || b1.stream.ended, false);
    });

    it('when every session of the credential has a request in flight its next initialize → 503 -32000; another credential still gets a child', { timeout: 40_000 }, async (t) => {
      const { h, log } = await perCredential(t);
      const mcp = `${h.url}/solo/mcp`;
      const init = (auth: Record<string, string>) => post(mcp, initMsg(), { accept: 'application/json', ...auth });
      for (const n of [1, 2]) {
        const res = await init(authA);
        assert.equal(res.status, 200, res.text);
        const sid = String(res.headers['mcp-session-id']);
        void post(mcp, call(`hang-${n}`, { what: 'hang' }), sessionHeaders(sid, authA)).catch(() => null);
        await waitFor(() => fileLines(log).filter((l) => l.startsWith('hang ')).length === n, 5_000, `a's request ${n} at its child`);
      }
      assertRpcError(await init(authA), 503, -32000);
      const b = await init(authB);
      assert.equal(b.status, 200, b.text);
      assert.equal(h.proxy.status().solo!.sessions, 3);
    });

    // F7. Evicted per-session children winding down (EOF, TERM, KILL: killGraceMs each) counted against no cap.
    it('F7 per-session children that ignore stdin EOF and SIGTERM, sessions churning: live children never exceed 2 × maxChildrenPerCredential nor 2 × maxChildrenPerServer; a newcomer refused there (503) ends no other session', { timeout: 30_000 }, async (t) => {
      // Stopping one of these children takes two kill-grace steps (EOF, then TERM, then KILL): 2 s each.
      const churn = async (limits: { maxChildrenPerCredential: number; maxChildrenPerServer: number }, cap: number) => {
        const f = reviewFiles('f7');
        const h = await reviewHarness(t, { servers: [reviewFixture('fix', 'stubborn', { FIXTURE_PIDFILE: f.pidFile }, { sessions: 'per-session' })] },
          { limits: { killGraceMs: 1_000, ...limits } }, f.pidFile);
        let max = 0;
        const sample = () => (max = Math.max(max, fileLines(f.pidFile).map(Number).filter(pidAlive).length));
        const sampler = setInterval(sample, 5);
        const statuses: number[] = [];
        // The newest session opened, and how many times it still answered right after a newcomer was refused: the
        // twice-the-cap check comes before eviction, so a 503 must not have ended it (459e62d).
        let newest: string | null = null;
        let keptAfter503 = 0;
        const deadline = Date.now() + 1_500;
        try {
          while (Date.now() < deadline) {
            const rs = await Promise.all(Array.from({ length: cap }, () => post(`${h.url}/fix/mcp`, initMsg(), { accept: 'application/json' })));
            for (const r of rs) {
              statuses.push(r.status);
              if (r.status === 200) {
                newest = String(r.headers['mcp-session-id']);
                continue;
              }
              assert.equal(r.status, 503, r.text);
              assert.equal(assertRpcError(r, 503, -32000).error.message, 'Too many sessions; retry later');
              assert.equal(r.headers['retry-after'], String(DEFAULT_LIMITS.retryAfterS));
              if (newest === null) continue;
              const still = await post(`${h.url}/fix/mcp`, call(`still-${statuses.length}`, { what: 'echo', text: 'still here' }), reviewHeaders(newest));
              assert.equal(still.status, 200, `the session opened before a refused newcomer: ${still.text}`);
              assert.equal(answerText(still), 'still here');
              keptAfter503++;
            }
            sample();
          }
        } finally {
          clearInterval(sampler);
        }
        return { limits, cap, max, opened: statuses.filter((s) => s === 200).length, spawned: fileLines(f.pidFile).length, refused: statuses.filter((s) => s === 503).length, keptAfter503 };
      };
      // One credential (no tokens) churning, once against each cap; both at once to keep the test short.
      const runs = await Promise.all([churn({ maxChildrenPerCredential: 1, maxChildrenPerServer: 16 }, 1), churn({ maxChildrenPerCredential: 16, maxChildrenPerServer: 1 }, 1)]);
      for (const r of runs) {
        assert.ok(r.spawned >= 2 * r.cap, `children reached the bound: ${JSON.stringify(r)}`);
        assert.ok(r.max <= 2 * r.cap, `live children over 2 × ${r.cap}: ${JSON.stringify(r)}`);
        assert.ok(r.refused > 0 && r.keptAfter503 > 0, `newcomers were refused at twice the cap, and the session before them kept: ${JSON.stringify(r)}`);
      }
    });
  });

  // Regression: a proxy bound to 127.0.0.2 answered its own Host with 403.
  it('hostAllowed(): bound to 127.0.0.2, Host: 127.0.0.2:PORT is accepted (the bound address); other names still → 403', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { host: '127.0.0.2', limits: FAST });
    await h.proxy.ready(10_000);
    const mcp = `http://127.0.0.2:${h.proxy.port}/fix/mcp`;
    const own = await post(mcp, initMsg(), { accept: 'application/json' });
    assert.equal(own.status, 200, own.text);
    assert.equal(typeof own.headers['mcp-session-id'], 'string');
    assert.equal((await post(mcp, initMsg(), { accept: 'application/json', host: `localhost:${h.proxy.port}` })).status, 200);
    assertRpcError(await post(mcp, initMsg(), { accept: 'application/json', host: `evil.example:${h.proxy.port}` }), 403, -32000);
  });

  // F1. A batch whose last request never finishes held every other answer without bound.
  it('F1 maxBatchAnswerBytes and maxQueuedBytesTotal bound the answers a batch holds: over either the connection is closed (warn "gave up on a batch"), its other requests are cancelled on the child; a JSON POST whose client went away frees what it held', { timeout: 20_000 }, async (t) => {
    const lines: string[] = [];
    const f = reviewFiles('f1');
    const h = await reviewHarness(t, { servers: [reviewFixture('fix', 'ok', { FIXTURE_PIDFILE: f.pidFile, FIXTURE_LOG: f.log })] },
      { log: captureLog(lines), limits: { ...FAST, maxBatchAnswerBytes: 64 * KIB, maxQueuedBytesTotal: 100 * KIB, requestTimeoutMs: 60_000 } }, f.pidFile);
    await h.proxy.ready(10_000);
    const mcp = `${h.url}/fix/mcp`;
    const sid = await reviewSession(h.url, 'fix', { version: '2025-03-26' }); // batches are 2025-03-26 only
    const hangs = () => fileLines(f.log).filter((l) => l.startsWith('hang ')).map((l) => l.slice(5));
    const cancels = () => fileLines(f.log).filter((l) => l.startsWith('cancelled ')).map((l) => l.slice(10));
    const GAVE_UP = (which: string) => `warn [http] gave up on a batch: its answers would hold more than ${which} allows; closed its connection`;

    // Per batch: 40 + 40 KiB held > 64 KiB.
    const overBatch = post(mcp, [call('b1', { what: 'line', bytes: 40 * KIB }), call('b2', { what: 'line', bytes: 40 * KIB }), call('b3', { what: 'hang' })], reviewHeaders(sid));
    await within(assert.rejects(overBatch, isHangUp), 5_000, 'the over-limit batch closed');
    assert.deepEqual(lines.filter((l) => l.includes('gave up on a batch')), [GAVE_UP('maxBatchAnswerBytes')]);
    await waitFor(() => cancels().length === 1 && hangs().length === 1, 5_000, 'the batch\'s hanging request cancelled on the child');
    assert.deepEqual(cancels(), hangs(), 'the cancel names the request left running');

    // Across batches: A holds 60 KiB (its second request hangs); B's 60 KiB more would pass the 100 KiB total.
    const clientA = http.request(mcp, { method: 'POST', headers: { ...JSON_HEADERS, ...reviewHeaders(sid) }, agent: false });
    clientA.on('error', () => {});
    clientA.end(JSON.stringify([call('a1', { what: 'line', bytes: 60 * KIB }), call('a2', { what: 'hang' })]));
    await waitFor(() => hangs().length === 2, 5_000, 'A\'s second request hanging');
    // The child answers in order: once this is answered, A's 60 KiB answer is held.
    assert.equal(answerText(await post(mcp, call('sync', { what: 'echo', text: 'in order' }), reviewHeaders(sid))), 'in order');
    const overTotal = post(mcp, [call('c1', { what: 'line', bytes: 60 * KIB }), call('c2', { what: 'hang' })], reviewHeaders(sid));
    await within(assert.rejects(overTotal, isHangUp), 5_000, 'the batch over the total closed');
    assert.deepEqual(lines.filter((l) => l.includes('gave up on a batch')), [GAVE_UP('maxBatchAnswerBytes'), GAVE_UP('maxQueuedBytesTotal')]);
    await waitFor(() => cancels().length === 2 && hangs().length === 3, 5_000, 'B\'s hanging request cancelled');
    assert.equal(cancels()[1], hangs()[2]);

    // A's client goes away: its 60 KiB are freed, so another 60 KiB batch is answered whole.
    clientA.destroy();
    const res = await within(post(mcp, [call('d1', { what: 'line', bytes: 60 * KIB }), call('d2', { what: 'echo', text: 'last' })], reviewHeaders(sid)), 5_000, 'a batch after A left');
    assert.equal(res.status, 200, res.text.slice(0, 200));
    const body = JSON.parse(res.text);
    assert.deepEqual(body.map((m: Json) => m.id), ['d1', 'd2']);
    assert.ok(body[0].result.content[0].text.length > 60 * KIB - 200, 'd1 whole');
    assert.equal(body[1].result.content[0].text, 'last');
    assert.equal(lines.filter((l) => l.includes('gave up on a batch')).length, 2);
  });

  // F2. Answers to pipelined requests sit in responses with no socket yet: they were counted nowhere.
  it('F2 pipelined POSTs on one socket that never reads: the connection closes past maxQueuedBytesPerConnection (warn "closed a connection with N bytes unread (maxQueuedBytesPerConnection 1048576)") and past maxQueuedBytesTotal', { timeout: 30_000 }, async (t) => {
    const COUNT = 24;
    const BYTES = 512 * KIB; // 12 MiB in all: far more than loopback socket buffers take
    for (const [limits, expected] of [
      [{ maxQueuedBytesPerConnection: MIB }, /^warn \[http\] closed a connection with (\d+) bytes unread \(maxQueuedBytesPerConnection 1048576\)$/],
      [{ maxQueuedBytesPerConnection: 64 * MIB, maxQueuedBytesTotal: 2 * MIB }, /^warn \[http\] closed a connection with (\d+) bytes unread: all connections together held more than 2097152 \(maxQueuedBytesTotal\)$/],
    ] as const) {
      const lines: string[] = [];
      const f = reviewFiles('f2');
      const h = await reviewHarness(t, { servers: [reviewFixture('fix', 'ok', { FIXTURE_PIDFILE: f.pidFile })] }, { log: captureLog(lines), limits: { ...FAST, ...limits } }, f.pidFile);
      await h.proxy.ready(10_000);
      const sid = await reviewSession(h.url, 'fix');
      const socket = await idleConnection(h.proxy.port);
      onCleanup(t, () => socket.destroy());
      socket.pause();
      let raw = '';
      for (let i = 0; i < COUNT; i++) raw += rawPost(sid, JSON.stringify(call(`p${i}`, { what: 'line', bytes: BYTES })));
      socket.write(raw);
      const line = await waitFor(() => lines.find((l) => / bytes unread/.test(l)), 10_000, `the pipelined connection closed (${JSON.stringify(limits)})`);
      assert.match(line, expected);
      const unread = Number(expected.exec(line)![1]);
      assert.ok(unread > ('maxQueuedBytesTotal' in limits ? 2 * MIB : MIB), line);
      // What the client then reads ends early: the connection was closed, not drained.
      let received = 0;
      socket.on('data', (c: Buffer) => (received += c.length));
      const closed = new Promise((resolve) => socket.on('close', resolve));
      socket.resume();
      await within(closed, 5_000, 'the client sees the connection end');
      assert.ok(received < COUNT * BYTES, `received ${received} of ${COUNT * BYTES}`);
      // (d0335cb logs the close once per answer still arriving for the closed connection; not asserted.)
      assert.equal((await request(`${h.url}/healthz`)).status, 200);
    }
  });

  // F4. The body budget was reserved from the declared Content-Length: four sockets declaring the maximum and
  // sending nothing refused everyone else with 503 until their request timeout.
  it('F4 sockets that declare maxBodyBytes and send nothing do not use up maxBodyBytesInFlight: other POSTs are answered 200, not 503', { timeout: 20_000 }, async (t) => {
    const f = reviewFiles('f4');
    const h = await reviewHarness(t, { servers: [reviewFixture('fix', 'ok', { FIXTURE_PIDFILE: f.pidFile })] },
      { limits: { ...FAST, maxBodyBytes: 64 * KIB, maxBodyBytesInFlight: 256 * KIB } }, f.pidFile);
    await h.proxy.ready(10_000);
    const sid = await reviewSession(h.url, 'fix');
    const hogs = await Promise.all([0, 1, 2, 3].map(() => idleConnection(h.proxy.port)));
    onCleanup(t, () => hogs.forEach((s) => s.destroy()));
    // Expect: 100-continue: Node answers "100 Continue" as it hands the request to the proxy, so once it is
    // back the proxy has seen the declared length (the old code reserved it right then).
    await Promise.all(hogs.map((s) => {
      let got = '';
      s.on('data', (c: Buffer) => (got += c.toString('latin1')));
      s.write(`POST /fix/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json\r\nMcp-Session-Id: ${sid}\r\nExpect: 100-continue\r\nContent-Length: ${64 * KIB}\r\n\r\n`);
      return waitFor(() => got.startsWith('HTTP/1.1 100 Continue'), 5_000, '100 Continue');
    }));
    for (let i = 0; i < 3; i++) {
      const res = await post(`${h.url}/fix/mcp`, call(`v${i}`, { what: 'echo', text: 'p'.repeat(8 * KIB) }), reviewHeaders(sid));
      assert.equal(res.status, 200, `POST ${i} while 4 × 64 KiB are declared: ${res.status} ${res.text.slice(0, 120)}`);
      assert.equal(JSON.parse(res.text).id, `v${i}`);
    }
  });
});

// ── 8. MCP 2026-07-28: sessionless requests, discover, listen, input requests ─────────────────────────────
//
// Raw HTTP for the wire rules (headers, _meta, ids, status codes, event streams), the official SDK v2 client
// (@modelcontextprotocol/client) in 'auto' and pinned modes for what a real 2026 client does, next to the
// 1.x clients on the same URL.

const MODERN = '2026-07-28';
const META_VERSION = 'io.modelcontextprotocol/protocolVersion';
const META_CAPS = 'io.modelcontextprotocol/clientCapabilities';
const META_CLIENT_INFO = 'io.modelcontextprotocol/clientInfo';
const META_SERVER_INFO = 'io.modelcontextprotocol/serverInfo';
/** Params whose value must also travel in Mcp-Name (streamable-http §Server Validation). */
const NAMED: Record<string, string> = { 'tools/call': 'name', 'resources/read': 'uri', 'prompts/get': 'name' };

/** A 2026-07-28 request: `_meta` carries the version, capabilities and client info (plus `meta`, which wins). */
function modernMsg(id: number | string | undefined, method: string, params: Json = {}, meta: Json = {}): Json {
  const msg: Json = {
    jsonrpc: '2.0',
    method,
    params: { ...params, _meta: { [META_VERSION]: MODERN, [META_CAPS]: {}, [META_CLIENT_INFO]: { name: 'raw-modern', version: '1.0.0' }, ...meta } },
  };
  if (id !== undefined) msg.id = id;
  return msg;
}

/** The headers a conforming 2026 client sends for `msg`: MCP-Protocol-Version, Mcp-Method, Mcp-Name. */
function modernHeaders(msg: Json): Record<string, string> {
  const headers: Record<string, string> = { 'mcp-protocol-version': MODERN, 'mcp-method': msg.method };
  const param = NAMED[msg.method];
  if (param && typeof msg.params?.[param] === 'string') headers['mcp-name'] = msg.params[param];
  return headers;
}

/** The request headers for a modern POST: JSON + the modern headers, then `overrides` (undefined removes one). */
function modernRequestHeaders(msg: Json, overrides: Record<string, string | undefined> = {}): Record<string, string> {
  const merged: Record<string, string | undefined> = { ...JSON_HEADERS, ...modernHeaders(msg), ...overrides };
  return Object.fromEntries(Object.entries(merged).filter((e): e is [string, string] => e[1] !== undefined));
}

/** POSTs a modern body with the headers a conforming client sends, changed by `overrides`. */
function postModern(url: string, msg: Json, overrides: Record<string, string | undefined> = {}): Promise<RawResponse> {
  return request(url, { method: 'POST', headers: modernRequestHeaders(msg, overrides), body: JSON.stringify(msg) });
}

/** A POST left open: `abort()` drops its connection (a client gone before the answer). */
function startPost(url: string, msg: Json, headers: Record<string, string>): { response: Promise<RawResponse | Error>; abort(): void } {
  let req: http.ClientRequest | undefined;
  const response = new Promise<RawResponse | Error>((resolve) => {
    req = http.request(url, { method: 'POST', headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', resolve);
    });
    req.on('error', resolve);
    req.end(JSON.stringify(msg));
  });
  return { response, abort: () => req!.destroy() };
}

/** The error answer of a modern request: status, code, and the request's own id. */
function assertModernError(res: RawResponse, status: number, code: number, id: number | string): Json {
  const body = assertRpcError(res, status, code);
  assert.deepEqual(body.id, id, `the error carries the request's id (body: ${res.text})`);
  return body;
}

/** The child-side ids of the fixture's "hang ID" lines. */
const hungIds = (log: string): string[] => fileLines(log).filter((l) => l.startsWith('hang ')).map((l) => l.slice(5));

type V2Exchange = { method: string; body: Json; status?: number; sessionId?: string | null };

/** An SDK v2 client ('auto': probe, then fall back; 'pin': 2026-07-28 only) with every HTTP exchange recorded. */
async function v2Client(t: TestContext, url: string, mode: 'auto' | 'pin'): Promise<{ client: V2Client; wire: V2Exchange[] }> {
  const wire: V2Exchange[] = [];
  const tracingFetch = async (input: string | URL, init: RequestInit = {}): Promise<Response> => {
    const exchange: V2Exchange = { method: init.method ?? 'GET', body: typeof init.body === 'string' ? JSON.parse(init.body) : undefined };
    wire.push(exchange);
    const res = await fetch(input, init);
    exchange.status = res.status;
    exchange.sessionId = res.headers.get('mcp-session-id');
    return res;
  };
  const client = new V2Client(
    { name: 'proxy-test-v2', version: '1.0.0' },
    { versionNegotiation: { mode: mode === 'pin' ? { pin: MODERN } : 'auto', probe: { timeoutMs: 10_000 } } },
  );
  t.after(() => client.close().catch(() => {}));
  await client.connect(new V2StreamableTransport(new URL(url), { fetch: tracingFetch }), { timeout: 15_000 });
  return { client, wire };
}

describe('8. MCP 2026-07-28: sessionless requests, discover, listen, input requests', () => {
  it('both eras on one URL: SDK 1.x Streamable and SSE clients and SDK v2 clients (auto, pinned) call tools on one shared child, and all four call again after the child is killed and restarted; modern answers carry no Mcp-Session-Id', { timeout: 60_000 }, async (t) => {
    const h = await harness(t, { servers: [everything()] }, { limits: FAST });
    await h.proxy.ready(20_000);
    const url = `${h.url}/everything/mcp`;
    const v1Streamable = await h.client('everything', 'mcp');
    const v1Sse = await h.client('everything', 'sse');
    const auto = await v2Client(t, url, 'auto');
    const pinned = await v2Client(t, url, 'pin');
    assert.equal(auto.client.getProtocolEra(), 'modern', 'the auto client found the modern era on the legacy URL');
    assert.equal(pinned.client.getProtocolEra(), 'modern');
    const v1Text = async (c: Client, msg: string) => textOf(await c.callTool({ name: 'echo', arguments: { message: msg } }));
    const v2Text = async (c: V2Client, msg: string) => textOf(await c.callTool({ name: 'echo', arguments: { message: msg } }));
    const callAll = async (round: string) => {
      assert.deepEqual(
        await Promise.all([v1Text(v1Streamable, `${round} 1`), v1Text(v1Sse, `${round} 2`), v2Text(auto.client, `${round} 3`), v2Text(pinned.client, `${round} 4`)]),
        [`Echo: ${round} 1`, `Echo: ${round} 2`, `Echo: ${round} 3`, `Echo: ${round} 4`],
      );
    };
    await callAll('before');
    const oldPid = h.proxy.status().everything!.pid!;
    process.kill(oldPid, 'SIGKILL');
    await waitFor(() => {
      const s = h.proxy.status().everything!;
      return s.state === 'ready' && s.pid !== null && s.pid !== oldPid;
    }, 15_000, 'the child restarted and ready');
    await callAll('after');
    for (const { wire } of [auto, pinned]) {
      const posts = wire.filter((e) => e.method === 'POST');
      assert.equal(posts[0]!.body.method, 'server/discover', 'the v2 client probes first');
      assert.ok(posts.every((e) => e.body.method !== 'initialize'), 'no initialize on the modern path');
      assert.ok(posts.length >= 3, `probe and two calls: ${posts.length}`);
      for (const e of posts) {
        assert.equal(e.status, 200, `${e.body.method} answered 200`);
        assert.equal(e.sessionId, null, `${e.body.method}: a modern answer has no Mcp-Session-Id`);
      }
    }
  });

  it('validation: -32022 (unsupported version, with supported/requested), -32020 (MCP-Protocol-Version, Mcp-Method, Mcp-Name mismatches; the =?base64?…?= name is accepted), -32602 (no clientCapabilities, non-string version), 404 -32601 (initialize, ping, logging/setLevel, resources/subscribe, unknown); every error keeps the request id; a notification gets 202', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const url = `${h.url}/fix/mcp`;
    const echo = (id: number | string, meta: Json = {}) => modernMsg(id, 'tools/call', { name: 'do', arguments: { what: 'echo', text: 'hi' } }, meta);
    for (const id of ['req-α', 7]) {
      // Unsupported version: the header repeats it (so the only fault is the version).
      const unsupported = await postModern(url, echo(id, { [META_VERSION]: '2027-01-01' }), { 'mcp-protocol-version': '2027-01-01' });
      const body = assertModernError(unsupported, 400, -32022, id);
      assert.deepEqual(body.error.data, { supported: [MODERN], requested: '2027-01-01' });

      // MCP-Protocol-Version must equal the version in _meta (checked first: a 2026 header on another body
      // version is a mismatch, not an unsupported version).
      assertModernError(await postModern(url, echo(id), { 'mcp-protocol-version': '2027-01-01' }), 400, -32020, id);
      assertModernError(await postModern(url, echo(id, { [META_VERSION]: '2027-01-01' })), 400, -32020, id);
      assertModernError(await postModern(url, echo(id), { 'mcp-protocol-version': undefined }), 400, -32020, id);
      // Mcp-Method: missing or not the method.
      assertModernError(await postModern(url, echo(id), { 'mcp-method': undefined }), 400, -32020, id);
      assertModernError(await postModern(url, echo(id), { 'mcp-method': 'tools/list' }), 400, -32020, id);
      // Mcp-Name on tools/call: missing or not params.name.
      assertModernError(await postModern(url, echo(id), { 'mcp-name': undefined }), 400, -32020, id);
      assertModernError(await postModern(url, echo(id), { 'mcp-name': 'other' }), 400, -32020, id);
      assertModernError(await postModern(url, echo(id), { 'mcp-name': `=?base64?${Buffer.from('other').toString('base64')}?=` }), 400, -32020, id);
      // The encoded form of the right name is the right name.
      const encoded = await postModern(url, echo(id), { 'mcp-name': `=?base64?${Buffer.from('do').toString('base64')}?=` });
      assert.equal(encoded.status, 200, encoded.text);
      assert.deepEqual(JSON.parse(encoded.text).id, id);
      assert.equal(textOf(JSON.parse(encoded.text).result), 'hi');

      // _meta: clientCapabilities is required; the version must be a string.
      const noCaps = echo(id);
      delete noCaps.params._meta[META_CAPS];
      assertModernError(await postModern(url, noCaps), 400, -32602, id);
      assertModernError(await postModern(url, echo(id, { [META_VERSION]: 20260728 })), 400, -32602, id);
      // The 2026 header on a body that claims no version: a modern request without its _meta → -32602.
      const unclaimed = { jsonrpc: '2.0', id, method: 'tools/call', params: { name: 'do', arguments: { what: 'echo', text: 'hi' } } };
      assertModernError(await postModern(url, unclaimed), 400, -32602, id);

      // Removed in 2026-07-28, and unknown: 404 -32601.
      for (const [method, params] of [
        ['initialize', { protocolVersion: MODERN, capabilities: {}, clientInfo: { name: 'x', version: '1' } }],
        ['ping', {}],
        ['logging/setLevel', { level: 'debug' }],
        ['resources/subscribe', { uri: 'fixture://a' }],
        ['no/such-method', {}],
      ] as const) {
        const res = await postModern(url, modernMsg(id, method, params));
        assertModernError(res, 404, -32601, id);
      }
    }
    // A notification has nothing to answer: 202, no body.
    const note = await postModern(url, modernMsg(undefined, 'notifications/initialized'));
    assert.equal(note.status, 202, note.text);
    assert.equal(note.text, '');
  });

  it('the lenient pair: a 2026 body with MCP-Protocol-Version 2025-11-25 and no Mcp-Method/Mcp-Name is served by default and refused (-32020) with strictProtocolHeader; 2025-06-18 is always refused', { timeout: 30_000 }, async (t) => {
    const lenientPair = { 'mcp-protocol-version': '2025-11-25', 'mcp-method': undefined, 'mcp-name': undefined };
    const echo = (id: number | string) => modernMsg(id, 'tools/call', { name: 'do', arguments: { what: 'echo', text: 'claude' } });

    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const url = `${h.url}/fix/mcp`;
    const served = await postModern(url, echo('l1'), lenientPair);
    assert.equal(served.status, 200, served.text);
    const result = JSON.parse(served.text);
    assert.equal(result.id, 'l1');
    assert.equal(textOf(result.result), 'claude');
    assert.equal(result.result.resultType, 'complete', 'answered on the modern path');
    // What such a client does send must still match.
    assertModernError(await postModern(url, echo('l2'), { ...lenientPair, 'mcp-name': 'other' }), 400, -32020, 'l2');
    assertModernError(await postModern(url, echo('l3'), { ...lenientPair, 'mcp-method': 'tools/list' }), 400, -32020, 'l3');
    // Another legacy version in the header is not the pair.
    assertModernError(await postModern(url, echo('l4'), { ...lenientPair, 'mcp-protocol-version': '2025-06-18' }), 400, -32020, 'l4');
    assertModernError(await postModern(url, echo('l5'), { 'mcp-protocol-version': '2025-06-18' }), 400, -32020, 'l5');

    const strict = await harness(t, { servers: [fixture('fix')] }, { limits: FAST, strictProtocolHeader: true });
    await strict.proxy.ready(10_000);
    const strictUrl = `${strict.url}/fix/mcp`;
    assertModernError(await postModern(strictUrl, echo('s1'), lenientPair), 400, -32020, 's1');
    assertModernError(await postModern(strictUrl, echo('s2'), { 'mcp-protocol-version': '2025-11-25' }), 400, -32020, 's2');
    assertModernError(await postModern(strictUrl, echo('s3'), { ...lenientPair, 'mcp-protocol-version': '2025-06-18' }), 400, -32020, 's3');
    const conforming = await postModern(strictUrl, echo('s4'));
    assert.equal(conforming.status, 200, conforming.text);
  });

  it('server/discover: supportedVersions, the child\'s capabilities minus logging and tasks, instructions, serverInfo, ttlMs (listTtlMs), cacheScope, resultType; a starting child is waited for; one not ready within startWaitMs → 503 with the id', { timeout: 60_000 }, async (t) => {
    const startWaitMs = 1_500;
    const h = await harness(
      t,
      { servers: [everything(), fixture('slow', 'slowinit', { env: { FIXTURE_INIT_DELAY_MS: '400' } }), fixture('stuck', 'noinit')] },
      { limits: { ...FAST, startWaitMs, listTtlMs: 4_321 } },
    );
    // The slow child is still starting: its discover waits for it instead of failing.
    assert.equal(h.proxy.status().slow!.state, 'starting', 'posted before the child answered initialize');
    const slow = await postModern(`${h.url}/slow/mcp`, modernMsg('d-slow', 'server/discover'));
    assert.equal(slow.status, 200, slow.text);
    const slowBody = JSON.parse(slow.text);
    assert.equal(slowBody.id, 'd-slow');
    assert.deepEqual(slowBody.result._meta[META_SERVER_INFO], { name: 'fixture', version: '1.0.0' });
    assert.deepEqual(slowBody.result.capabilities, { tools: {}, resources: { subscribe: true } });
    assert.equal('instructions' in slowBody.result, false, 'the fixture gives no instructions');

    // One that never answers initialize: 503 after startWaitMs, with the request's id.
    const t0 = Date.now();
    const stuck = await postModern(`${h.url}/stuck/mcp`, modernMsg(41, 'server/discover'));
    const waited = Date.now() - t0;
    assertModernError(stuck, 503, -32000, 41);
    assert.ok(waited >= startWaitMs - 50, `waited ${waited} ms of startWaitMs ${startWaitMs}`);
    assert.equal(h.proxy.status().stuck!.state, 'starting');

    await waitFor(() => h.proxy.status().everything!.state === 'ready', 20_000, 'everything ready');
    const legacy = await h.client('everything', 'mcp');
    const childCaps = legacy.getServerCapabilities() as Json;
    assert.ok(childCaps.logging && childCaps.tasks, `server-everything declares logging and tasks: ${JSON.stringify(childCaps)}`);
    const { logging: _logging, tasks: _tasks, ...bridged } = childCaps;
    const res = await postModern(`${h.url}/everything/mcp`, modernMsg(3, 'server/discover'));
    assert.equal(res.status, 200, res.text);
    assert.equal(res.headers['mcp-session-id'], undefined);
    const body = JSON.parse(res.text);
    assert.equal(body.id, 3);
    const r = body.result;
    assert.equal(r.resultType, 'complete');
    assert.deepEqual(r.supportedVersions, [MODERN]);
    assert.deepEqual(r.capabilities, bridged);
    assert.equal(typeof r.instructions, 'string');
    assert.equal(r.instructions, legacy.getInstructions());
    assert.deepEqual(r._meta[META_SERVER_INFO], legacy.getServerVersion());
    assert.equal(r.ttlMs, 4_321);
    assert.equal(r.cacheScope, 'public');
  });

  it('result stamping: tools/list gets resultType, ttlMs = listTtlMs (a server\'s own listTtlMs wins), cacheScope public and serverInfo; resources/read gets ttlMs 0 and private; child -32002 → -32602, child -32601 → HTTP 404; the child never sees the io.modelcontextprotocol/* _meta keys', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix'), fixture('nocache', 'ok', { listTtlMs: 0 })] }, { limits: { ...FAST, listTtlMs: 7_777 } });
    await h.proxy.ready(10_000);
    const url = `${h.url}/fix/mcp`;
    const serverInfo = { name: 'fixture', version: '1.0.0' };

    const list = await postModern(url, modernMsg('tl', 'tools/list'));
    assert.equal(list.status, 200, list.text);
    const listBody = JSON.parse(list.text);
    assert.equal(listBody.id, 'tl');
    assert.deepEqual(listBody.result, {
      tools: [{ name: 'do', inputSchema: { type: 'object' } }],
      resultType: 'complete', ttlMs: 7_777, cacheScope: 'public', _meta: { [META_SERVER_INFO]: serverInfo },
    });

    // A server's own listTtlMs wins over the limit (0: do not cache).
    const uncached = JSON.parse((await postModern(`${h.url}/nocache/mcp`, modernMsg('tl0', 'tools/list'))).text);
    assert.equal(uncached.result.ttlMs, 0, JSON.stringify(uncached));
    assert.equal(uncached.result.cacheScope, 'public');

    // resources/read: a read is per request. The fixture echoes the params it got: the 2026 keys are gone,
    // any other _meta key is kept.
    const read = await postModern(url, modernMsg(5, 'resources/read', { uri: 'fixture://params' }, { 'com.example/trace': 't-1' }));
    assert.equal(read.status, 200, read.text);
    const readBody = JSON.parse(read.text);
    assert.equal(readBody.id, 5);
    assert.equal(readBody.result.resultType, 'complete');
    assert.equal(readBody.result.ttlMs, 0);
    assert.equal(readBody.result.cacheScope, 'private');
    assert.deepEqual(readBody.result._meta, { [META_SERVER_INFO]: serverInfo });
    assert.deepEqual(JSON.parse(readBody.result.contents[0].text), { uri: 'fixture://params', _meta: { 'com.example/trace': 't-1' } });
    // With only the 2026 keys, the child gets no _meta at all.
    const bare = await postModern(url, modernMsg(6, 'resources/read', { uri: 'fixture://params' }));
    assert.deepEqual(JSON.parse(JSON.parse(bare.text).result.contents[0].text), { uri: 'fixture://params' });

    // A tools/call result gets resultType and serverInfo, no cache fields.
    const called = await postModern(url, modernMsg('c', 'tools/call', { name: 'do', arguments: { what: 'echo', text: 'x' } }));
    const calledResult = JSON.parse(called.text).result;
    assert.equal(calledResult.resultType, 'complete');
    assert.deepEqual(calledResult._meta, { [META_SERVER_INFO]: serverInfo });
    assert.equal('ttlMs' in calledResult, false);
    assert.equal('cacheScope' in calledResult, false);

    // The child's 2025 "resource not found" is 2026's -32602 (message and data kept).
    const missing = await postModern(url, modernMsg('m', 'resources/read', { uri: 'fixture://missing' }));
    const missingBody = JSON.parse(missing.text);
    assert.equal(missingBody.id, 'm');
    assert.equal(missingBody.error?.code, -32602, missing.text);
    assert.equal(missingBody.error.message, 'Resource not found');
    assert.deepEqual(missingBody.error.data, { uri: 'fixture://missing' });

    // The child's -32601 (it has no prompts) is answered 404, with the child's own message.
    const noPrompts = await postModern(url, modernMsg(8, 'prompts/list'));
    const noPromptsBody = assertModernError(noPrompts, 404, -32601, 8);
    assert.equal(noPromptsBody.error.message, 'Method not found', 'the child\'s answer, not a local refusal');
  });

  it('per-request SSE: a call with a progressToken gets only its own progress and then its answer (X-Accel-Buffering: no, no id: lines); closing that stream, or dropping a JSON request, sends notifications/cancelled for the child-side id', { timeout: 60_000 }, async (t) => {
    const log = path.join(tmpDir('modern-sse'), 'fixture.log');
    const h = await harness(t, { servers: [everything(), fixture('fix', 'ok', { env: { FIXTURE_LOG: log } })] }, { limits: FAST });
    await h.proxy.ready(20_000);
    const everythingUrl = `${h.url}/everything/mcp`;
    const longRun = (id: string, token: string) =>
      modernMsg(id, 'tools/call', { name: 'trigger-long-running-operation', arguments: { duration: 0.6, steps: 3 } }, { progressToken: token });
    // Two at once on one child: each stream carries its own progress only.
    const [a, b] = await Promise.all([postModern(everythingUrl, longRun('A', 'tok-A')), postModern(everythingUrl, longRun('B', 'tok-B'))]);
    for (const [res, id, token] of [[a, 'A', 'tok-A'], [b, 'B', 'tok-B']] as const) {
      assert.equal(res.status, 200, res.text);
      assert.match(String(res.headers['content-type']), /^text\/event-stream/);
      assert.equal(res.headers['x-accel-buffering'], 'no');
      assert.equal(res.headers['mcp-session-id'], undefined);
      assert.doesNotMatch(res.text, /^id:/m, 'no event ids (no resumption in 2026-07-28)');
      const msgs = messages(res);
      const progress = msgs.slice(0, -1);
      assert.deepEqual(progress.map((m) => m.method), ['notifications/progress', 'notifications/progress', 'notifications/progress']);
      assert.deepEqual(progress.map((m) => m.params.progressToken), [token, token, token], `${id}: only its own progress, under its own token`);
      assert.deepEqual(progress.map((m) => m.params.progress), [1, 2, 3]);
      const last = msgs.at(-1);
      assert.equal(last.id, id, 'the answer comes last');
      assert.equal(last.result.resultType, 'complete');
      assert.match(textOf(last.result), /Long running operation completed/);
    }

    // Closing the stream before the answer cancels the call on the child, under the child's id.
    const fixUrl = `${h.url}/fix/mcp`;
    const hang = (id: string) => modernMsg(id, 'tools/call', { name: 'do', arguments: { what: 'hang' } }, { progressToken: `p-${id}` });
    const streamed = hang('h1');
    const stream = await openRpcStream(fixUrl, { method: 'POST', headers: modernRequestHeaders(streamed, { accept: 'application/json, text/event-stream' }), body: JSON.stringify(streamed) });
    assert.equal(stream.res.statusCode, 200);
    assert.match(String(stream.res.headers['content-type']), /^text\/event-stream/);
    assert.equal(stream.res.headers['x-accel-buffering'], 'no');
    const [childId1] = await waitFor(() => (hungIds(log).length === 1 ? hungIds(log) : null), 5_000, 'the call hanging in the child');
    assert.equal(fileLines(log).some((l) => l.startsWith('cancelled ')), false);
    stream.close();
    await waitFor(() => fileLines(log).includes(`cancelled ${childId1}`), 5_000, `notifications/cancelled for child id ${childId1}`);

    // A JSON (non-SSE) modern request whose connection drops: the same.
    const plain = modernMsg('h2', 'tools/call', { name: 'do', arguments: { what: 'hang' } });
    const pending = startPost(fixUrl, plain, modernRequestHeaders(plain, { accept: 'application/json' }));
    const hungNow = await waitFor(() => (hungIds(log).length === 2 ? hungIds(log) : null), 5_000, 'the second call hanging in the child');
    const childId2 = hungNow[1]!;
    assert.notEqual(childId2, childId1);
    assert.equal(fileLines(log).includes(`cancelled ${childId2}`), false);
    pending.abort();
    await waitFor(() => fileLines(log).includes(`cancelled ${childId2}`), 5_000, `notifications/cancelled for child id ${childId2}`);
    await pending.response;
  });

  it('per-session servers answer modern requests 400 -32022 naming the legacy versions; an SDK v2 auto client falls back to initialize and calls a tool, a pinned one fails to connect', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('solo', 'ok', { sessions: 'per-session' })] }, { limits: FAST });
    const url = `${h.url}/solo/mcp`;
    for (const id of ['ps', 9]) {
      const res = await postModern(url, modernMsg(id, 'server/discover'));
      const body = assertModernError(res, 400, -32022, id);
      assert.deepEqual(body.error.data, { supported: [...SUPPORTED_PROTOCOL_VERSIONS], requested: MODERN });
      assert.ok(!body.error.data.supported.includes(MODERN));
    }
    assertModernError(await postModern(url, modernMsg(10, 'tools/call', { name: 'do', arguments: { what: 'echo', text: 'x' } })), 400, -32022, 10);

    const auto = await v2Client(t, url, 'auto');
    assert.equal(auto.client.getProtocolEra(), 'legacy');
    assert.equal(textOf(await auto.client.callTool({ name: 'do', arguments: { what: 'echo', text: 'fell back' } })), 'fell back');
    const posts = auto.wire.filter((e) => e.method === 'POST').map((e) => e.body.method);
    assert.deepEqual(posts.slice(0, 2), ['server/discover', 'initialize'], 'probed, then initialized');
    await auto.client.close();

    await assert.rejects(v2Client(t, url, 'pin'), 'a pinned client has no fallback');
  });

  it('the per-credential in-flight cap (maxPendingPerSession) holds for modern calls: past it → 429 with the id; a call that ends frees its place', { timeout: 30_000 }, async (t) => {
    const log = path.join(tmpDir('modern-cap'), 'fixture.log');
    const h = await harness(t, { servers: [fixture('fix', 'ok', { env: { FIXTURE_LOG: log } })] }, { limits: { ...FAST, maxPendingPerSession: 2, retryAfterS: 3 } });
    await h.proxy.ready(10_000);
    const url = `${h.url}/fix/mcp`;
    const hang = (id: string) => modernMsg(id, 'tools/call', { name: 'do', arguments: { what: 'hang' } });
    const held = ['h1', 'h2'].map((id) => startPost(url, hang(id), modernRequestHeaders(hang(id), { accept: 'application/json' })));
    t.after(() => held.forEach((p) => p.abort()));
    await waitFor(() => hungIds(log).length === 2, 5_000, 'two calls hanging in the child');
    const third = await postModern(url, hang('h3'));
    assertModernError(third, 429, -32000, 'h3');
    assert.equal(third.headers['retry-after'], '3');
    assert.equal(hungIds(log).length, 2, 'the refused call never reached the child');
    // One ends (its client leaves): a new call fits again.
    held[0]!.abort();
    await waitFor(() => fileLines(log).some((l) => l.startsWith('cancelled ')), 5_000, 'the first call cancelled');
    const fourth = await postModern(url, modernMsg('e', 'tools/call', { name: 'do', arguments: { what: 'echo', text: 'room' } }));
    assert.equal(fourth.status, 200, fourth.text);
    assert.equal(textOf(JSON.parse(fourth.text).result), 'room');
  });
});

// 8b. subscriptions/listen and input requests (MRTR).
//
// Raw HTTP for the wire shapes (listen acknowledgement and events, input_required, requestState checks) and
// the SDK v2 client (@modelcontextprotocol/client, imported dynamically so this block needs no import of its
// own at the top of the file) for the end-to-end flows.

describe('8b. MCP 2026-07-28: subscriptions/listen and input requests', () => {
  const MODERN = '2026-07-28';
  const SUBSCRIPTION_ID = 'io.modelcontextprotocol/subscriptionId';
  const modernMeta = (caps: Json = {}): Json => ({
    'io.modelcontextprotocol/protocolVersion': MODERN,
    'io.modelcontextprotocol/clientCapabilities': caps,
    'io.modelcontextprotocol/clientInfo': { name: 'raw-modern', version: '1.0.0' },
  });
  const NAMED: Record<string, string> = { 'tools/call': 'name', 'prompts/get': 'name', 'resources/read': 'uri' };

  /** One 2026-07-28 request: MCP-Protocol-Version, Mcp-Method, Mcp-Name and _meta all as a modern client sends them. */
  function modernPost(url: string, id: number | string, method: string, params: Json, o: { caps?: Json; headers?: Record<string, string>; meta?: Json } = {}): Promise<RawResponse> {
    const headers: Record<string, string> = { 'mcp-protocol-version': MODERN, 'mcp-method': method };
    if (NAMED[method]) headers['mcp-name'] = String(params[NAMED[method]!]);
    Object.assign(headers, o.headers);
    return post(url, { jsonrpc: '2.0', id, method, params: { ...params, _meta: { ...modernMeta(o.caps ?? {}), ...o.meta } } }, headers);
  }

  /** A subscriptions/listen stream opened by raw POST; closed by the test's cleanup. */
  async function listenStream(t: TestContext, url: string, id: number | string, notifications: Json, headers: Record<string, string> = {}): Promise<SseStream> {
    const body = JSON.stringify({ jsonrpc: '2.0', id, method: 'subscriptions/listen', params: { notifications, _meta: modernMeta() } });
    const stream = await openRpcStream(url, {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream', 'mcp-protocol-version': MODERN, 'mcp-method': 'subscriptions/listen', ...headers },
      body,
    });
    onCleanup(t, () => stream.close());
    assert.equal(stream.res.statusCode, 200, 'subscriptions/listen is answered with a stream');
    assert.match(String(stream.res.headers['content-type']), /^text\/event-stream/);
    return stream;
  }

  const ackOf = (stream: SseStream): Promise<Json> =>
    nextMessage(stream, (m) => m.method === 'notifications/subscriptions/acknowledged', 5_000, 'the listen acknowledgement');

  type V2Client = InstanceType<(typeof import('@modelcontextprotocol/client'))['Client']>;

  /** An SDK v2 client (auto: server/discover probe, or pinned to 2026-07-28); closed by the test's cleanup. */
  async function v2Client(
    t: TestContext,
    url: string,
    o: { mode?: 'auto' | 'pin'; onSample?: (params: Json) => Json | Promise<Json>; onElicit?: (params: Json) => Json | Promise<Json> } = {},
  ): Promise<V2Client> {
    const { Client: ClientV2, StreamableHTTPClientTransport: TransportV2 } = await import('@modelcontextprotocol/client');
    const client = new ClientV2(
      { name: 'proxy-test-v2', version: '1.0.0' },
      {
        capabilities: { ...(o.onSample ? { sampling: {} } : {}), ...(o.onElicit ? { elicitation: { form: {} } } : {}) },
        versionNegotiation: { mode: o.mode === 'pin' ? { pin: MODERN } : 'auto' },
      },
    );
    if (o.onSample) client.setRequestHandler('sampling/createMessage', async (req: Json) => o.onSample!(req.params));
    if (o.onElicit) client.setRequestHandler('elicitation/create', async (req: Json) => o.onElicit!(req.params));
    await client.connect(new TransportV2(new URL(url)));
    onCleanup(t, () => client.close());
    assert.equal(client.getProtocolEra(), 'modern', 'the v2 client negotiated 2026-07-28 through the proxy');
    return client;
  }

  // A stdio server for listen tests. FIXTURE_CAPS: the capabilities it declares. FIXTURE_LOG gets "subscribe URI",
  // "unsubscribe URI" and "call ID" lines. tools/call {what:'notify', notes:[{method, params}]} writes those
  // notifications, then answers; {what:'echo', text} answers text.
  const LISTEN_FIXTURE = String.raw`
'use strict';
const fs = require('node:fs');
const caps = JSON.parse(process.env.FIXTURE_CAPS || '{"tools":{}}');
const logLine = (s) => { if (process.env.FIXTURE_LOG) fs.appendFileSync(process.env.FIXTURE_LOG, s + '\n'); };
const send = (m) => process.stdout.write(JSON.stringify(m) + '\n');
const reply = (id, result) => send({ jsonrpc: '2.0', id, result });
${STDIN_LINES}
process.stdin.on('end', () => process.exit(0));
function onMessage(msg) {
  if (msg.id === undefined || msg.method === undefined) return;
  if (msg.method === 'initialize') return reply(msg.id, { protocolVersion: msg.params.protocolVersion, capabilities: caps, serverInfo: { name: 'listen-fixture', version: '1.0.0' } });
  if (msg.method === 'ping') return reply(msg.id, {});
  if (msg.method === 'resources/subscribe' || msg.method === 'resources/unsubscribe') {
    logLine(msg.method.slice('resources/'.length) + ' ' + msg.params.uri);
    return reply(msg.id, {});
  }
  if (msg.method === 'tools/list') return reply(msg.id, { tools: [{ name: 'do', inputSchema: { type: 'object' } }] });
  if (msg.method !== 'tools/call') return send({ jsonrpc: '2.0', id: msg.id, error: { code: -32601, message: 'Method not found' } });
  const a = (msg.params && msg.params.arguments) || {};
  logLine('call ' + JSON.stringify(msg.id));
  if (a.what === 'notify') for (const n of a.notes || []) send({ jsonrpc: '2.0', method: n.method, params: n.params || {} });
  return reply(msg.id, { content: [{ type: 'text', text: a.what === 'echo' ? String(a.text) : 'notified' }] });
}
`;
  const listenFixture = (name: string, caps: Json, log: string): ServerConfig =>
    srv(name, ['-e', LISTEN_FIXTURE], { env: { FIXTURE_CAPS: JSON.stringify(caps), FIXTURE_LOG: log } });
  const notifyArgs = (...notes: Json[]): Json => ({ what: 'notify', notes });

  describe('subscriptions/listen', () => {
    let h: Harness;
    let toolsLog: string;
    before(async () => {
      toolsLog = path.join(tmpDir('listen'), 'tools.log');
      h = await startHarness({ servers: [listenFixture('lc', { tools: { listChanged: true } }, toolsLog)] }, { limits: FAST });
      await h.proxy.ready(10_000);
    });
    after(() => h.stop());

    it('the first event is notifications/subscriptions/acknowledged naming the listen id and only what the child can send; its tools/list_changed follows with the subscriptionId, the rest is not sent', { timeout: 15_000 }, async (t) => {
      const uri = 'test://lc/one';
      const stream = await listenStream(t, `${h.url}/lc/mcp`, 'listen:ack', { toolsListChanged: true, promptsListChanged: true, resourcesListChanged: true, resourceSubscriptions: [uri] });
      const ack = await ackOf(stream);
      assert.deepEqual(streamMessages(stream)[0], ack, 'the acknowledgement is the first message on the stream');
      assert.deepEqual(ack.params.notifications, { toolsListChanged: true }, 'only tools.listChanged is declared by the child');
      assert.equal(ack.params._meta?.[SUBSCRIPTION_ID], 'listen:ack');
      // The child sends what was not honoured first, then a tools/list_changed; on one stream order is kept, so
      // anything not honoured that got through would come before it.
      const called = await modernPost(`${h.url}/lc/mcp`, 1, 'tools/call', {
        name: 'do',
        arguments: notifyArgs(
          { method: 'notifications/prompts/list_changed' },
          { method: 'notifications/resources/list_changed' },
          { method: 'notifications/resources/updated', params: { uri } },
          { method: 'notifications/tools/list_changed', params: { _meta: { mark: 'child-meta' } } },
        ),
      });
      assert.equal(called.status, 200, called.text);
      assert.equal(onlyMessage(called).result?.resultType, 'complete', called.text);
      const changed = await nextMessage(stream, (m) => m.method === 'notifications/tools/list_changed', 5_000, 'tools/list_changed on the listen stream');
      assert.equal(changed.params._meta?.[SUBSCRIPTION_ID], 'listen:ack', JSON.stringify(changed));
      assert.equal(changed.params._meta?.mark, 'child-meta', 'the child\'s own _meta is kept beside the subscriptionId');
      assert.deepEqual(streamMessages(stream).map((m) => m.method), ['notifications/subscriptions/acknowledged', 'notifications/tools/list_changed']);
      assert.ok(!fileLines(toolsLog).some((l) => l.startsWith('subscribe ')), `a child without resources.subscribe was sent resources/subscribe: ${fileLines(toolsLog).join(' | ')}`);
    });

    it('without Accept: text/event-stream subscriptions/listen is refused with 406', { timeout: 15_000 }, async () => {
      const body = { jsonrpc: '2.0', id: 'listen:406', method: 'subscriptions/listen', params: { notifications: { toolsListChanged: true }, _meta: modernMeta() } };
      const res = await post(`${h.url}/lc/mcp`, body, { accept: 'application/json', 'mcp-protocol-version': MODERN, 'mcp-method': 'subscriptions/listen' });
      const answer = assertRpcError(res, 406, -32000);
      assert.equal(answer.id, 'listen:406');
      assert.match(answer.error.message, /text\/event-stream/);
    });

    it('resources/subscribe is reference-counted on the child together with a legacy session: one subscribe, one unsubscribe after both are gone (either order)', { timeout: 15_000 }, async (t) => {
      const subsLog = path.join(tmpDir('listen-refs'), 'fixture.log');
      // maxSessionsPerServer also bounds listen streams per child: with 1, a second listen is 503 until the first is dropped.
      const hs = await harness(t, { servers: [listenFixture('subs', { tools: {}, resources: { subscribe: true } }, subsLog)] }, { limits: { ...FAST, maxSessionsPerServer: 1 } });
      await hs.proxy.ready(10_000);
      const url = `${hs.url}/subs/mcp`;
      const logOf = (uri: string) => fileLines(subsLog).filter((l) => l.endsWith(` ${uri}`)).map((l) => l.split(' ')[0]);
      let barrierId = 100;
      // The child reads stdin in order: once a later tools/call is answered, every earlier line it was sent is logged.
      const barrier = async () => {
        const res = await modernPost(url, ++barrierId, 'tools/call', { name: 'do', arguments: { what: 'echo', text: 'barrier' } });
        assert.equal(res.status, 200, res.text);
      };
      const sid = await rawSession(hs.url, 'subs');
      let legacyId = 10;
      const legacy = async (method: string, uri: string) => {
        const res = await post(url, { jsonrpc: '2.0', id: ++legacyId, method, params: { uri } }, sessionHeaders(sid));
        assert.equal(res.status, 200, res.text);
        assert.deepEqual(JSON.parse(res.text).result, {}, res.text);
      };
      const listenBody = JSON.stringify({ jsonrpc: '2.0', id: 'probe', method: 'subscriptions/listen', params: { notifications: {}, _meta: modernMeta() } });
      const dropped = () => waitFor(async () => {
        const probe = await openRpcStream(url, { method: 'POST', headers: { 'content-type': 'application/json', accept: 'text/event-stream', 'mcp-protocol-version': MODERN, 'mcp-method': 'subscriptions/listen' }, body: listenBody });
        probe.close();
        return probe.res.statusCode === 200;
      }, 5_000, 'the proxy to drop the closed listen stream');

      // Order 1: legacy first, listen second; the legacy session unsubscribes first, the listen stream closes last.
      const a = 'test://subs/a';
      await legacy('resources/subscribe', a);
      await waitFor(() => logOf(a).length === 1, 5_000, 'the legacy subscribe to reach the child');
      const first = await listenStream(t, url, 'listen:a', { resourceSubscriptions: [a] });
      assert.deepEqual((await ackOf(first)).params.notifications, { resourceSubscriptions: [a] });
      await barrier();
      assert.deepEqual(logOf(a), ['subscribe'], 'a listen on a URI a legacy session holds sends no second subscribe');
      await legacy('resources/unsubscribe', a);
      await barrier();
      assert.deepEqual(logOf(a), ['subscribe'], 'the legacy unsubscribe reached the child while a listen stream holds the URI');
      first.close();
      await waitFor(() => logOf(a).length === 2, 5_000, 'the unsubscribe once the last holder (the listen stream) is gone');
      await barrier();
      assert.deepEqual(logOf(a), ['subscribe', 'unsubscribe']);

      // Order 2: listen first, legacy second; the listen stream closes first, the legacy session unsubscribes last.
      const b = 'test://subs/b';
      const second = await listenStream(t, url, 'listen:b', { resourceSubscriptions: [b] });
      await ackOf(second);
      await waitFor(() => logOf(b).length === 1, 5_000, 'the listen subscribe to reach the child');
      await legacy('resources/subscribe', b);
      await barrier();
      assert.deepEqual(logOf(b), ['subscribe'], 'a legacy subscribe to a URI a listen stream holds sends a second subscribe');
      second.close();
      await dropped();
      await barrier();
      assert.deepEqual(logOf(b), ['subscribe'], 'closing the listen stream while the legacy session holds the URI unsubscribed the child');
      await legacy('resources/unsubscribe', b);
      await waitFor(() => logOf(b).length === 2, 5_000, 'the unsubscribe once the legacy session let go');
      await barrier();
      assert.deepEqual(logOf(b), ['subscribe', 'unsubscribe']);
    });

    it('the SDK v2 client\'s listen() is acknowledged with the honoured filter, its tools/list_changed handler fires, and close() ends it locally', { timeout: 15_000 }, async (t) => {
      const client = await v2Client(t, `${h.url}/lc/mcp`, { mode: 'pin' });
      const seen: Json[] = [];
      client.setNotificationHandler('notifications/tools/list_changed', (n: Json) => void seen.push(n));
      const sub = await within(client.listen({ toolsListChanged: true, promptsListChanged: true }), 5_000, 'listen()');
      assert.deepEqual(sub.honoredFilter, { toolsListChanged: true });
      const result = await client.callTool({ name: 'do', arguments: notifyArgs({ method: 'notifications/tools/list_changed' }) });
      assert.equal(textOf(result), 'notified');
      const note = await waitFor(() => seen[0], 5_000, 'the v2 client\'s tools/list_changed handler');
      assert.match(String(note.params?._meta?.[SUBSCRIPTION_ID]), /\S/, `the notification names its subscription: ${JSON.stringify(note)}`);
      await sub.close();
      assert.equal(await within(sub.closed, 5_000, 'sub.closed'), 'local');
    });
  });

  it('resources/updated from server-everything reaches the listen streams subscribed to that URI, and no other', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [everything('ev')] }, { limits: FAST });
    await h.proxy.ready(15_000);
    const url = `${h.url}/ev/mcp`;
    const one = 'demo://resource/dynamic/text/1';
    const two = 'demo://resource/dynamic/text/2';
    const onlyOne = await listenStream(t, url, 'listen:one', { resourceSubscriptions: [one] });
    const both = await listenStream(t, url, 7, { resourceSubscriptions: [one, two] });
    assert.deepEqual((await ackOf(onlyOne)).params.notifications, { resourceSubscriptions: [one] });
    assert.deepEqual((await ackOf(both)).params.notifications, { resourceSubscriptions: [one, two] });
    const updates = (s: SseStream) => streamMessages(s).filter((m) => m.method === 'notifications/resources/updated');
    let id = 0;
    const toggle = async () => {
      const res = await modernPost(url, ++id, 'tools/call', { name: 'toggle-subscriber-updates', arguments: {} });
      assert.equal(res.status, 200, res.text);
      assert.equal(onlyMessage(res).result?.resultType, 'complete', res.text);
    };
    // Each toggle pair (on, off) makes the child send every URI subscribed at that moment, in subscription order
    // (one, then two). The child registers a subscription only after an await of its own, so pairs are repeated
    // until the stream subscribed to both shows `two` followed by a later `one`, and the first stream has that
    // later `one` too: an update of `two` delivered to it would have come before.
    const uris = (s: SseStream) => updates(s).map((m) => m.params.uri);
    const settled = () => {
      const seen = uris(both);
      const firstTwo = seen.indexOf(two);
      const ones = seen.filter((u) => u === one).length;
      return firstTwo >= 0 && seen.indexOf(one, firstTwo) > firstTwo && uris(onlyOne).filter((u) => u === one).length === ones;
    };
    const deadline = Date.now() + 10_000;
    while (!settled()) {
      assert.ok(Date.now() < deadline, `updates did not arrive: ${JSON.stringify(uris(both))} | ${JSON.stringify(uris(onlyOne))}`);
      await toggle();
      await toggle();
      await waitFor(settled, 500, 'this pair\'s updates').catch(() => undefined);
    }
    assert.ok(updates(onlyOne).every((m) => m.params.uri === one), `an update for another URI reached the stream: ${JSON.stringify(updates(onlyOne))}`);
    for (const m of updates(onlyOne)) assert.equal(m.params._meta?.[SUBSCRIPTION_ID], 'listen:one');
    for (const m of updates(both)) assert.equal(m.params._meta?.[SUBSCRIPTION_ID], 7);
    assert.deepEqual(new Set(updates(both).map((m) => m.params.uri)), new Set([one, two]));
  });

  it('a listen stream outlives a restart of its child: the subscription is sent to the new child, and its notifications reach the stream', { timeout: 15_000 }, async (t) => {
    const log = path.join(tmpDir('listen-restart'), 'fixture.log');
    const h = await harness(t, { servers: [listenFixture('subs', { tools: { listChanged: true }, resources: { subscribe: true } }, log)] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const url = `${h.url}/subs/mcp`;
    const uri = 'test://restart/r';
    const stream = await listenStream(t, url, 'listen:restart', { toolsListChanged: true, resourceSubscriptions: [uri] });
    assert.deepEqual((await ackOf(stream)).params.notifications, { toolsListChanged: true, resourceSubscriptions: [uri] });
    const subscribes = () => fileLines(log).filter((l) => l === `subscribe ${uri}`).length;
    await waitFor(() => subscribes() === 1, 5_000, 'the subscribe');
    const pid = h.proxy.status().subs!.pid!;
    process.kill(pid, 'SIGKILL');
    await waitFor(() => h.proxy.status().subs!.state === 'ready' && h.proxy.status().subs!.pid !== pid, 10_000, 'the child to be restarted');
    await waitFor(() => subscribes() === 2, 5_000, 'the subscription to be sent to the new child');
    assert.equal(stream.ended, false, 'the listen stream was ended by a restart of its child');
    const res = await modernPost(url, 1, 'tools/call', { name: 'do', arguments: notifyArgs({ method: 'notifications/resources/updated', params: { uri } }, { method: 'notifications/tools/list_changed' }) });
    assert.equal(res.status, 200, res.text);
    const changed = await nextMessage(stream, (m) => m.method === 'notifications/tools/list_changed', 5_000, 'tools/list_changed from the new child');
    assert.equal(changed.params._meta?.[SUBSCRIPTION_ID], 'listen:restart');
    const updated = streamMessages(stream).find((m) => m.method === 'notifications/resources/updated');
    assert.equal(updated?.params?.uri, uri, JSON.stringify(streamMessages(stream)));
    assert.equal(updated.params._meta?.[SUBSCRIPTION_ID], 'listen:restart');
  });

  it('closing the proxy ends a listen stream gracefully: a JSON-RPC result for the listen id carrying the subscriptionId, then the end', { timeout: 15_000 }, async (t) => {
    const log = path.join(tmpDir('listen-close'), 'fixture.log');
    const h = await harness(t, { servers: [listenFixture('lc', { tools: { listChanged: true } }, log)] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const stream = await listenStream(t, `${h.url}/lc/mcp`, 'listen:bye', { toolsListChanged: true });
    await ackOf(stream);
    await within(h.proxy.close(), 10_000, 'proxy.close()');
    await waitFor(() => stream.ended, 5_000, 'the listen stream to end');
    const last = streamMessages(stream).at(-1);
    assert.equal(last?.id, 'listen:bye', `the last message answers the listen request: ${JSON.stringify(streamMessages(stream))}`);
    assert.equal(last.error, undefined);
    assert.equal(last.result?._meta?.[SUBSCRIPTION_ID], 'listen:bye', JSON.stringify(last));
  });

  describe('input requests (MRTR) on a shared child with "clientCapabilities"', () => {
    let h: Harness;
    let log: string;
    const CAPS = { clientCapabilities: ['sampling', 'elicitation'] as ServerConfig['clientCapabilities'] };
    before(async () => {
      log = path.join(tmpDir('mrtr'), 'fixture.log');
      h = await startHarness({ servers: [srv('ev', [EVERYTHING, 'stdio'], CAPS), fixture('fix', 'ok', { ...CAPS, env: { FIXTURE_LOG: log } })] }, { limits: FAST });
      await h.proxy.ready(15_000);
    });
    after(() => h.stop());

    const samplingParams = (text: string): Json => ({ messages: [{ role: 'user', content: { type: 'text', text } }], maxTokens: 1 });
    const askArgs = (text: string): Json => ({ what: 'ask', method: 'sampling/createMessage', params: samplingParams(text) });
    const sampled = (text: string): Json => ({ role: 'assistant', content: { type: 'text', text }, model: 'test-model' });
    const SAMPLING = { sampling: {} };
    /** The fixture answers an 'ask' call with the JSON of what its request got: {result} or {error}. */
    const askOutcome = (res: RawResponse): Json => {
      const m = onlyMessage(res);
      assert.equal(m.result?.resultType, 'complete', res.text);
      return JSON.parse(textOf(m.result));
    };
    const fixLines = (prefix: string) => fileLines(log).filter((l) => l.startsWith(prefix));

    it('the SDK v2 client (auto) with sampling and elicitation handlers completes server-everything\'s trigger-sampling-request and trigger-elicitation-request', { timeout: 20_000 }, async (t) => {
      const asked: string[] = [];
      const client = await v2Client(t, `${h.url}/ev/mcp`, {
        mode: 'auto',
        onSample: (p) => {
          asked.push(`sampling:${p.messages[0].content.text}`);
          return sampled('sampled by v2');
        },
        onElicit: (p) => {
          asked.push(`elicitation:${p.message}`);
          return { action: 'accept', content: { name: 'Ada Lovelace', check: true } };
        },
      });
      const names = (await client.listTools()).tools.map((tool: Json) => tool.name);
      assert.ok(names.includes('trigger-sampling-request') && names.includes('trigger-elicitation-request'), `tools: ${names.join(', ')}`);
      const s = await within(client.callTool({ name: 'trigger-sampling-request', arguments: { prompt: 'hello v2', maxTokens: 5 } }), 10_000, 'trigger-sampling-request');
      assert.ok(!s.isError, JSON.stringify(s));
      assert.match(textOf(s), /LLM sampling result/);
      assert.match(textOf(s), /sampled by v2/);
      const e = await within(client.callTool({ name: 'trigger-elicitation-request', arguments: {} }), 10_000, 'trigger-elicitation-request');
      assert.ok(!e.isError, JSON.stringify(e));
      assert.match(textOf(e), /Name: Ada Lovelace/);
      assert.equal(asked.length, 2, asked.join(' | '));
      assert.match(asked[0]!, /^sampling:.*hello v2/);
      assert.match(asked[1]!, /^elicitation:/);
    });

    it('raw: input_required carries the child\'s request under its own id and a requestState; the retry completes; replayed, tampered or re-aimed states are -32602 and leave the held call usable', { timeout: 15_000 }, async () => {
      const url = `${h.url}/fix/mcp`;
      const args = askArgs('raw mrtr');
      const first = await modernPost(url, 1, 'tools/call', { name: 'do', arguments: args }, { caps: SAMPLING });
      assert.equal(first.status, 200, first.text);
      const m = onlyMessage(first);
      assert.equal(m.id, 1);
      const r = m.result;
      assert.equal(r?.resultType, 'input_required', first.text);
      const keys = Object.keys(r.inputRequests ?? {});
      assert.equal(keys.length, 1, first.text);
      const key = keys[0]!;
      assert.match(key, /^ask-\d+$/, 'keyed by the child\'s own (string) request id');
      assert.deepEqual(r.inputRequests[key], { method: 'sampling/createMessage', params: samplingParams('raw mrtr') });
      assert.equal(typeof r.requestState, 'string');
      const state: string = r.requestState;
      const answer = { [key]: sampled('raw answer') };
      const retry = (id: number, requestState: string, extra: Json = {}) =>
        modernPost(url, id, 'tools/call', { name: 'do', arguments: { ...args, ...extra }, requestState, inputResponses: answer }, { caps: SAMPLING });

      // Tampered: one character of the signed body, one of the MAC (a middle one: the last may be padding bits).
      const dot = state.indexOf('.');
      const flip = (s: string, i: number) => s.slice(0, i) + (s[i] === 'A' ? 'B' : 'A') + s.slice(i + 1);
      // Forged: the payload decoded, one field changed (a later expiry), encoded again under the old MAC.
      const payload = JSON.parse(Buffer.from(state.slice(0, dot), 'base64url').toString('utf8'));
      const forged = `${Buffer.from(JSON.stringify({ ...payload, e: payload.e + 1 })).toString('base64url')}${state.slice(dot)}`;
      for (const [what, bad] of [['body', flip(state, 3)], ['mac', flip(state, dot + 10)], ['truncated', state.slice(0, -1)], ['forged', forged]] as const) {
        const res = await retry(2, bad);
        const err = assertRpcError(res, 400, -32602);
        assert.equal(err.id, 2, `${what}: ${res.text}`);
      }
      // Genuine state, other params (the arguments of another call): refused.
      const aimed = await retry(3, state, { text: 'another argument' });
      assertRpcError(aimed, 400, -32602);
      assert.match(JSON.parse(aimed.text).error.message, /another request/);
      assert.deepEqual(fixLines('response '), [], `a refused retry reached the child: ${fileLines(log).join(' | ')}`);

      const done = await retry(4, state);
      assert.equal(done.status, 200, done.text);
      assert.equal(onlyMessage(done).id, 4);
      assert.deepEqual(askOutcome(done), { result: sampled('raw answer') });
      assert.ok(fixLines('response ').some((l) => l.startsWith(`response ${JSON.stringify(key)} `)), fileLines(log).join(' | '));

      const replayed = await retry(5, state);
      assertRpcError(replayed, 400, -32602);
      assert.equal(fixLines(`response ${JSON.stringify(key)} `).length, 1, 'the replay reached the child');
    });

    it('a requestState presented under another credential is refused (-32602) and leaves the held call usable by its own', { timeout: 20_000 }, async (t) => {
      const A = 'mrtr-token-a-0123456789';
      const B = 'mrtr-token-b-0123456789';
      const own = await harness(t, { servers: [fixture('fix', 'ok', CAPS)] }, { tokens: [A, B], limits: FAST });
      await own.proxy.ready(10_000);
      const url = `${own.url}/fix/mcp`;
      const args = askArgs('whose state');
      const as = (token: string, id: number, extra: Json = {}) =>
        modernPost(url, id, 'tools/call', { name: 'do', arguments: args, ...extra }, { caps: SAMPLING, headers: bearer(token) });
      const first = onlyMessage(await as(A, 1)).result;
      assert.equal(first?.resultType, 'input_required');
      const key = Object.keys(first.inputRequests)[0]!;
      const retry = { requestState: first.requestState, inputResponses: { [key]: sampled('from B') } };
      const stolen = await as(B, 2, retry);
      assertRpcError(stolen, 400, -32602);
      const done = await as(A, 3, { ...retry, inputResponses: { [key]: sampled('from A') } });
      assert.equal(done.status, 200, done.text);
      assert.equal(onlyMessage(done).result?.resultType, 'complete', done.text);
    });

    it('a retry that answers nothing is asked the same request again in a new round; the earlier round\'s state is then refused and the new one completes', { timeout: 15_000 }, async () => {
      const url = `${h.url}/fix/mcp`;
      const args = askArgs('two rounds');
      const call = (id: number, extra: Json = {}) => modernPost(url, id, 'tools/call', { name: 'do', arguments: args, ...extra }, { caps: SAMPLING });
      const r1 = onlyMessage(await call(1)).result;
      assert.equal(r1?.resultType, 'input_required');
      const key = Object.keys(r1.inputRequests)[0]!;
      const again = await call(2, { requestState: r1.requestState, inputResponses: {} });
      assert.equal(again.status, 200, again.text);
      const r2 = onlyMessage(again).result;
      assert.equal(r2?.resultType, 'input_required', again.text);
      assert.deepEqual(r2.inputRequests, r1.inputRequests, 'the unanswered request is asked again, under the same key');
      assert.notEqual(r2.requestState, r1.requestState);
      const stale = await call(3, { requestState: r1.requestState, inputResponses: { [key]: sampled('stale') } });
      assertRpcError(stale, 400, -32602);
      const done = await call(4, { requestState: r2.requestState, inputResponses: { [key]: sampled('second round') } });
      assert.deepEqual(askOutcome(done), { result: sampled('second round') });
    });

    it('a client that did not declare sampling: the child\'s sampling request gets -32021 and the call completes with what the child answers (no input_required)', { timeout: 15_000 }, async () => {
      const before = fixLines('response ').length;
      const res = await modernPost(`${h.url}/fix/mcp`, 'nocap', 'tools/call', { name: 'do', arguments: askArgs('no capability') }, { caps: { elicitation: {} } });
      assert.equal(res.status, 200, res.text);
      const outcome = askOutcome(res);
      assert.equal(outcome.error?.code, -32021, JSON.stringify(outcome));
      assert.deepEqual(outcome.error?.data, { requiredCapabilities: { sampling: {} } });
      const logged = fixLines('response ').slice(before);
      assert.equal(logged.length, 1, logged.join(' | '));
      assert.match(logged[0]!, /"code":-32021/);
    });

    it('three SDK v2 clients and one SDK 1.x client call an asking tool at once, round after round: each is asked its own question and gets its own answer (the lane)', { timeout: 30_000 }, async (t) => {
      const url = `${h.url}/fix/mcp`;
      const wrong: string[] = [];
      const asked: string[] = [];
      const handler = (who: string) => (p: Json) => {
        const text = String(p.messages?.[0]?.content?.text);
        asked.push(text);
        if (!text.startsWith(`${who}:`)) wrong.push(`${who} was asked ${text}`);
        return sampled(`answer to ${text}`);
      };
      const modern = await Promise.all(['m1', 'm2', 'm3'].map(async (who) => ({ who, client: await v2Client(t, url, { mode: 'auto', onSample: handler(who) }) })));
      const legacy = await h.client('fix', 'mcp', {}, { capabilities: { sampling: {} } });
      onCleanup(t, () => legacy.close());
      legacy.setRequestHandler(CreateMessageRequestSchema, async (req) => handler('l1')(req.params) as Json);
      for (let round = 1; round <= 3; round++) {
        const calls = [
          ...modern.map(({ who, client }) => ({ who, p: client.callTool({ name: 'do', arguments: askArgs(`${who}:${round}`) }) as Promise<Json> })),
          { who: 'l1', p: legacy.callTool({ name: 'do', arguments: askArgs(`l1:${round}`) }) as Promise<Json> },
        ];
        const results = await within(Promise.all(calls.map((c) => c.p)), 15_000, `round ${round}`);
        results.forEach((result, i) => {
          const who = calls[i]!.who;
          assert.deepEqual(JSON.parse(textOf(result)), { result: sampled(`answer to ${who}:${round}`) }, `${who}, round ${round}`);
        });
      }
      assert.deepEqual(wrong, []);
      assert.equal(asked.length, 12, asked.join(' | '));
      assert.equal(new Set(asked).size, 12, `a question was asked twice: ${asked.join(' | ')}`);
    });
  });

  it('an input request not answered within continuationTtlMs: the child\'s request gets an error, the call finishes on the child (not cancelled, its answer dropped), the retry is -32602, and the lane moves on', { timeout: 15_000 }, async (t) => {
    const log = path.join(tmpDir('mrtr-ttl'), 'fixture.log');
    const h = await harness(t, { servers: [fixture('fix', 'ok', { clientCapabilities: ['sampling'], env: { FIXTURE_LOG: log } })] }, { limits: { ...FAST, continuationTtlMs: 300 } });
    await h.proxy.ready(10_000);
    const url = `${h.url}/fix/mcp`;
    const args = { what: 'ask', method: 'sampling/createMessage', params: { messages: [], maxTokens: 1 } };
    const first = await modernPost(url, 1, 'tools/call', { name: 'do', arguments: args }, { caps: { sampling: {} } });
    const r = onlyMessage(first).result;
    assert.equal(r?.resultType, 'input_required', first.text);
    const key = Object.keys(r.inputRequests)[0]!;
    const issuedAt = Date.now();
    const responded = await waitFor(() => fileLines(log).find((l) => l.startsWith(`response ${JSON.stringify(key)} `)), 5_000, 'an answer to the child\'s request after expiry');
    assert.ok(Date.now() - issuedAt >= 250, `the child's request was answered ${Date.now() - issuedAt} ms after input_required, before continuationTtlMs (300)`);
    assert.match(responded, /"error":\{"code":/, responded);
    const retry = await modernPost(url, 2, 'tools/call', { name: 'do', arguments: args, requestState: r.requestState, inputResponses: { [key]: { role: 'assistant', content: { type: 'text', text: 'late' }, model: 'm' } } }, { caps: { sampling: {} } });
    assertRpcError(retry, 400, -32602);
    // The lane is free: the next call runs, and its own request is asked (the child is not "maybe still running").
    const echo = await within(modernPost(url, 3, 'tools/call', { name: 'do', arguments: { what: 'echo', text: 'after expiry' } }), 5_000, 'a call after expiry');
    assert.equal(textOf(onlyMessage(echo).result), 'after expiry');
    const again = await within(modernPost(url, 4, 'tools/call', { name: 'do', arguments: args }, { caps: { sampling: {} } }), 5_000, 'an asking call after expiry');
    const r2 = onlyMessage(again).result;
    assert.equal(r2?.resultType, 'input_required', again.text);
    const done = await modernPost(url, 5, 'tools/call', { name: 'do', arguments: args, requestState: r2.requestState, inputResponses: { [Object.keys(r2.inputRequests)[0]!]: { role: 'assistant', content: { type: 'text', text: 'on time' }, model: 'm' } } }, { caps: { sampling: {} } });
    assert.equal(onlyMessage(done).result?.resultType, 'complete', done.text);
    const lines = fileLines(log);
    assert.equal(lines.filter((l) => l.startsWith(`response ${JSON.stringify(key)} `)).length, 1, `the late retry's answer reached the child: ${lines.join(' | ')}`);
    assert.deepEqual(lines.filter((l) => l.startsWith('cancelled ')), [], 'an expired call is left to finish on the child, not cancelled');
  });

  it('a retry after the child died gets the exit error under its own id (the client is not blamed), the state is then spent, and the proxy holds nothing of the call (the lane is free)', { timeout: 15_000 }, async (t) => {
    const log = path.join(tmpDir('mrtr-died'), 'fixture.log');
    const h = await harness(t, { servers: [fixture('fix', 'ok', { clientCapabilities: ['sampling'], env: { FIXTURE_LOG: log } })] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const url = `${h.url}/fix/mcp`;
    const args = { what: 'ask', method: 'sampling/createMessage', params: { messages: [], maxTokens: 1 } };
    const first = await modernPost(url, 1, 'tools/call', { name: 'do', arguments: args }, { caps: { sampling: {} } });
    const r = onlyMessage(first).result;
    assert.equal(r?.resultType, 'input_required', first.text);
    const key = Object.keys(r.inputRequests)[0]!;
    const pid = h.proxy.status().fix!.pid!;
    process.kill(pid, 'SIGKILL');
    await waitFor(() => !pidAlive(pid), 5_000, 'the child to die');
    await waitFor(() => h.proxy.status().fix!.state === 'ready' && h.proxy.status().fix!.pid !== pid, 10_000, 'the child to be restarted');
    const retry = await within(modernPost(url, 2, 'tools/call', { name: 'do', arguments: args, requestState: r.requestState, inputResponses: { [key]: { role: 'assistant', content: { type: 'text', text: 'x' }, model: 'm' } } }, { caps: { sampling: {} } }), 5_000, 'the retry');
    const died = onlyMessage(retry);
    assert.equal(retry.status, 200, retry.text);
    assert.equal(died.id, 2, retry.text);
    assert.equal(died.error?.code, -32005, retry.text);
    assert.match(died.error.message, /exited/);
    const again = await within(modernPost(url, 4, 'tools/call', { name: 'do', arguments: args, requestState: r.requestState, inputResponses: {} }, { caps: { sampling: {} } }), 5_000, 'a replay');
    assertRpcError(again, 400, -32602);
    const echo = await within(modernPost(url, 3, 'tools/call', { name: 'do', arguments: { what: 'echo', text: 'after death' } }), 5_000, 'a call after the death');
    assert.equal(textOf(onlyMessage(echo).result), 'after death');
    // The new child got no answer meant for the dead one's request.
    assert.deepEqual(fileLines(log).filter((l) => l.startsWith('response ')), []);
  });

  it('with maxLaneQueue 1, while one call holds the lane and one waits, another is refused with "Too many requests waiting"', { timeout: 15_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix', 'ok', { clientCapabilities: ['sampling'] })] }, { limits: { ...FAST, maxLaneQueue: 1 } });
    await h.proxy.ready(10_000);
    const url = `${h.url}/fix/mcp`;
    const args = { what: 'ask', method: 'sampling/createMessage', params: { messages: [], maxTokens: 1 } };
    const held = await modernPost(url, 1, 'tools/call', { name: 'do', arguments: args }, { caps: { sampling: {} } });
    const r = onlyMessage(held).result;
    assert.equal(r?.resultType, 'input_required', held.text);
    // Two more at once: one waits in the queue (its answer comes only once the lane is free), the other is refused.
    const pending = [2, 3].map((id) => modernPost(url, id, 'tools/call', { name: 'do', arguments: { what: 'echo', text: `echo ${id}` } }));
    const refused = await within(Promise.race(pending.map((p, i) => p.then((res) => ({ i, res })))), 5_000, 'one of the two to be refused while the lane is held');
    const err = onlyMessage(refused.res);
    assert.equal(err.error?.code, -32000, refused.res.text);
    assert.match(err.error.message, /Too many requests waiting/);
    const key = Object.keys(r.inputRequests)[0]!;
    const done = await modernPost(url, 4, 'tools/call', { name: 'do', arguments: args, requestState: r.requestState, inputResponses: { [key]: { role: 'assistant', content: { type: 'text', text: 'go' }, model: 'm' } } }, { caps: { sampling: {} } });
    assert.equal(onlyMessage(done).result?.resultType, 'complete', done.text);
    const waited = await within(pending[1 - refused.i]!, 5_000, 'the queued call once the lane is free');
    assert.equal(textOf(onlyMessage(waited).result), `echo ${3 - refused.i}`);
  });

  // The hostile review of this path (fixed in dcc846c): one test per finding, each reproducing what the review
  // found. A stdio server made for them: FIXTURE_LOG gets "got ID METHOD" for every request it receives, "call ID
  // ARGS" for every tools/call, "asked ID" for each of its own requests, "response ID OUTCOME" for the answers to
  // them, "cancelled ID", "note METHOD" for other notifications, and "subscribe URI"/"unsubscribe URI".
  // tools/call {what}:
  //   'ask'       its requests a.asks ([{id?, method, params}]; default one sampling request) at once; the call is
  //               answered with [{id, result|error}] once all are answered
  //   'late'      one sampling request, and the call is answered without waiting for it at the next 'release'
  //   'progress'  progress 1 (under its _meta.progressToken) and a sampling request; once answered, progress 2
  //               and 3, then the answer
  //   'then-ask'  its answer and, in the same write, a sampling request (id "then-ask") the ended call caused
  //   'stall'     answers, then reads nothing from stdin until SIGUSR2
  //   'echo'      a.text
  // tools/list {cursor}: 'hold' is answered at the next 'release'; 'release' first answers what 'late' and 'hold'
  // left; 'more' makes one more sampling request for the last 'ask' call and answers the list 150 ms later.
  const MRTR_FIXTURE = String.raw`
'use strict';
const fs = require('node:fs');
const logLine = (s) => { if (process.env.FIXTURE_LOG) fs.appendFileSync(process.env.FIXTURE_LOG, s + '\n'); };
const send = (...ms) => process.stdout.write(ms.map((m) => JSON.stringify(m) + '\n').join(''));
const result = (id, r) => ({ jsonrpc: '2.0', id, result: r });
const text = (id, t) => result(id, { content: [{ type: 'text', text: String(t) }] });
const SAMPLE = { messages: [{ role: 'user', content: { type: 'text', text: 'q' } }], maxTokens: 1 };
let askSeq = 0;
const waiting = new Map();
const late = [];
const heldLists = [];
let lastAsking = null;
let keepAlive = null;
function ask(call, method, params, id) {
  if (id === undefined) id = 'ask-' + (++askSeq);
  call.left.add(id);
  waiting.set(id, call);
  logLine('asked ' + JSON.stringify(id));
  return { jsonrpc: '2.0', id, method, params };
}
${STDIN_LINES}
process.stdin.on('end', () => process.exit(0));
process.on('SIGUSR2', () => { clearInterval(keepAlive); process.stdin.resume(); });
function onMessage(msg) {
  const p = msg.params || {};
  if (msg.method === 'initialize') {
    return send(result(msg.id, { protocolVersion: p.protocolVersion, capabilities: { tools: {}, resources: { subscribe: true } }, serverInfo: { name: 'mrtr-fixture', version: '1.0.0' } }));
  }
  if (msg.method === undefined) {
    if (msg.id === undefined || msg.id === null) return;
    const outcome = msg.error ? { error: msg.error } : { result: msg.result };
    logLine('response ' + JSON.stringify(msg.id) + ' ' + JSON.stringify(outcome));
    const call = waiting.get(msg.id);
    if (!call) return;
    waiting.delete(msg.id);
    call.left.delete(msg.id);
    call.outcomes.push({ id: msg.id, ...outcome });
    if (call.left.size === 0) call.done();
    return;
  }
  if (msg.id === undefined) {
    if (msg.method === 'notifications/cancelled') return logLine('cancelled ' + JSON.stringify(p.requestId));
    return logLine('note ' + msg.method);
  }
  logLine('got ' + JSON.stringify(msg.id) + ' ' + msg.method);
  if (msg.method === 'ping') return send(result(msg.id, {}));
  if (msg.method === 'resources/subscribe' || msg.method === 'resources/unsubscribe') {
    logLine(msg.method.slice('resources/'.length) + ' ' + p.uri);
    return send(result(msg.id, {}));
  }
  if (msg.method === 'tools/list') {
    const list = result(msg.id, { tools: [{ name: 'do', inputSchema: { type: 'object' } }] });
    if (p.cursor === 'hold') return void heldLists.push(list);
    if (p.cursor === 'release') return send(...late.splice(0).map((id) => text(id, 'answered without input')), ...heldLists.splice(0), list);
    if (p.cursor === 'more' && lastAsking) {
      send(ask(lastAsking, 'sampling/createMessage', SAMPLE));
      return void setTimeout(() => send(list), 150);
    }
    return send(list);
  }
  if (msg.method !== 'tools/call') return send({ jsonrpc: '2.0', id: msg.id, error: { code: -32601, message: 'Method not found' } });
  const a = p.arguments || {};
  logLine('call ' + JSON.stringify(msg.id) + ' ' + JSON.stringify(a));
  const call = { left: new Set(), outcomes: [], done: () => send(text(msg.id, JSON.stringify(call.outcomes))) };
  switch (a.what) {
    case 'echo': return send(text(msg.id, a.text));
    case 'ask':
      lastAsking = call;
      return send(...(a.asks || [{ method: 'sampling/createMessage', params: SAMPLE }]).map((q) => ask(call, q.method, q.params, q.id)));
    case 'late':
      late.push(msg.id);
      call.done = () => {};
      return send(ask(call, 'sampling/createMessage', SAMPLE));
    case 'progress': {
      const token = p._meta && p._meta.progressToken;
      const progress = (n) => ({ jsonrpc: '2.0', method: 'notifications/progress', params: { progressToken: token, progress: n, total: 3 } });
      call.done = () => send(progress(2), progress(3), text(msg.id, JSON.stringify(call.outcomes)));
      return send(progress(1), ask(call, 'sampling/createMessage', SAMPLE));
    }
    case 'then-ask':
      return send(text(msg.id, 'done'), ask({ left: new Set(), outcomes: [], done: () => {} }, 'sampling/createMessage', SAMPLE, 'then-ask'));
    case 'stall':
      send(text(msg.id, 'stalled'));
      process.stdin.pause();
      keepAlive = setInterval(() => {}, 1 << 30);
      return;
    default: return send({ jsonrpc: '2.0', id: msg.id, error: { code: -32602, message: 'unknown what' } });
  }
}
`;

  it('results are stamped by splicing the child\'s line when that is exact, and re-serialised otherwise: both serialiser layouts, an empty result, a result with its own _meta, duplicate result members, a large non-ASCII line', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const url = `${h.url}/fix/mcp`;
    const big = 'é'.repeat(20_000);
    const cases: [string, Json][] = [
      ['{"jsonrpc":"2.0","id":$ID,"result":{"content":[{"type":"text","text":"a"}]}}', { content: [{ type: 'text', text: 'a' }] }],
      ['{"result":{"content":[{"type":"text","text":"b"}]},"jsonrpc":"2.0","id":$ID}', { content: [{ type: 'text', text: 'b' }] }],
      ['{"jsonrpc":"2.0","id":$ID,"result":{}}', {}],
      ['{"result":{},"jsonrpc":"2.0","id":$ID}', {}],
      ['{"jsonrpc":"2.0","id":$ID,"result":{"content":[],"_meta":{"mine":1}}}', { content: [], _meta: { mine: 1 } }],
      ['{"jsonrpc":"2.0","id":$ID,"result":{"x":1},"result":{"y":2}}', { y: 2 }],
      ['{"jsonrpc":"2.0","id":$ID,"result":{"nested":{"result":{"r":1}}}}', { nested: { result: { r: 1 } } }],
      [`{"result":{"content":[{"type":"text","text":"${big}"}]},"jsonrpc":"2.0","id":$ID}`, { content: [{ type: 'text', text: big }] }],
    ];
    for (const [i, [line, expected]] of cases.entries()) {
      const res = await modernPost(url, `req-${i}`, 'tools/call', { name: 'do', arguments: { what: 'raw', text: line } });
      const msg = onlyMessage(res);
      assert.equal(msg.id, `req-${i}`, `${i}: ${res.text.slice(0, 200)}`);
      const { resultType, _meta, ...rest } = msg.result;
      assert.equal(resultType, 'complete', `${i}`);
      assert.deepEqual(_meta?.['io.modelcontextprotocol/serverInfo'], { name: 'fixture', version: '1.0.0' }, `${i}`);
      const { _meta: expectedMeta, ...expectedRest } = expected as Record<string, Json>;
      assert.deepEqual(rest, expectedRest, `${i}`);
      if (expectedMeta) assert.equal(_meta.mine, 1, `${i}: the child's own _meta is kept`);
    }
  });

  describe('the hostile review of this path, finding by finding (fixed in dcc846c)', () => {
    it('with maxLaneQueue 4 (below the per-credential share): requests whose clients left do not fill the queue, another credential\'s request is queued', { timeout: 30_000 }, async (t) => {
      const { url } = await mrtrProxy(t, 'demo-a', { tokens: [TOKEN_A, TOKEN_B], limits: { ...FAST, maxLaneQueue: 4, maxPendingPerSession: 1 } });
      const waitsForLane = async (headers: Record<string, string>) => (await post(url, ping('probe'), headers)).status === 429;
      await holdLane(url, AUTH_A);
      const sessions = await Promise.all(Array.from({ length: 4 }, () => legacyHeaders(url, {}, AUTH_A)));
      const queued = await Promise.all(sessions.map((s, i) => legacyStream(t, url, s, call(i, { what: 'echo', text: `gone ${i}` }))));
      for (const s of sessions) assert.ok(await waitsForLane(s));
      for (const stream of queued) stream.close();
      const b = await legacyHeaders(url, {}, AUTH_B);
      let attempts = 0;
      await waitFor(async () => {
        await legacyStream(t, url, b, call(`b-${++attempts}`, { what: 'echo', text: 'from B' }));
        return waitsForLane(b);
      }, 3_000, `B's request to be queued (${attempts} attempts refused)`);
    });

    it('a legacy notifications/cancelled for a queued request answers that request\'s own POST (-32800) and ends it', { timeout: 30_000 }, async (t) => {
      const { url } = await mrtrProxy(t, 'demo-c');
      const held = await holdLane(url);
      const s = await legacyHeaders(url);
      const get = await openRpcStream(url, { headers: { ...s, accept: 'text/event-stream' } });
      onCleanup(t, () => get.close());
      const victim = await legacyStream(t, url, s, call(42, { what: 'echo', text: 'x' }));
      await post(url, { jsonrpc: '2.0', method: 'notifications/cancelled', params: { requestId: 42 } }, s);
      const cancelled = await nextMessage(victim, (m) => m.id === 42, 5_000, '-32800 on the request\'s own stream');
      assert.equal(cancelled.error?.code, -32800, JSON.stringify(cancelled));
      const behind = await legacyStream(t, url, s, call(43, { what: 'echo', text: 'behind' }));
      await held.finish();
      await nextMessage(behind, (m) => m.id === 43, 5_000, 'behind');
      await waitFor(() => victim.ended, 3_000, `the cancelled request's POST stream to end (messages on it: ${JSON.stringify(streamMessages(victim))})`);
    });

    const SAMPLING = { sampling: {} };
    const sampled = (text: string): Json => ({ role: 'assistant', content: { type: 'text', text }, model: 'test-model' });
    const TOKEN_A = 'lane-token-a-0123456789abcdef';
    const TOKEN_B = 'lane-token-b-0123456789abcdef';
    const AUTH_A = { authorization: `Bearer ${TOKEN_A}` };
    const AUTH_B = { authorization: `Bearer ${TOKEN_B}` };

    /** A proxy serving MRTR_FIXTURE as "fix", shared, with "clientCapabilities": ["sampling"] (so it has a lane). */
    async function mrtrProxy(t: TestContext, prefix: string, options: StartOptions = {}): Promise<{ h: Harness; url: string; lines(prefix: string): string[] }> {
      const log = path.join(tmpDir(prefix), 'fixture.log');
      const server = srv('fix', ['-e', MRTR_FIXTURE], { clientCapabilities: ['sampling'], env: { FIXTURE_LOG: log } });
      const h = await harness(t, { servers: [server] }, { limits: FAST, ...options });
      await h.proxy.ready(10_000);
      return { h, url: `${h.url}/fix/mcp`, lines: (prefix: string) => fileLines(log).filter((l) => l.startsWith(prefix)) };
    }

    /** A modern call answered input_required: it holds the lane until finish() retries it with the answer. */
    async function holdLane(url: string, auth: Record<string, string> = {}): Promise<{ finish(): Promise<RawResponse> }> {
      const args = { what: 'ask' };
      const first = await modernPost(url, 'held', 'tools/call', { name: 'do', arguments: args }, { caps: SAMPLING, headers: auth });
      const r = onlyMessage(first).result;
      assert.equal(r?.resultType, 'input_required', first.text);
      const key = Object.keys(r.inputRequests)[0]!;
      const retry = { name: 'do', arguments: args, requestState: r.requestState, inputResponses: { [key]: sampled('go') } };
      return { finish: () => within(modernPost(url, 'held-retry', 'tools/call', retry, { caps: SAMPLING, headers: auth }), 5_000, 'the held call\'s retry') };
    }

    /** initialize + notifications/initialized of a legacy Streamable session; the headers of its later requests. */
    async function legacyHeaders(url: string, caps: Json = {}, auth: Record<string, string> = {}): Promise<Record<string, string>> {
      const init = initMsg(0);
      init.params.capabilities = caps;
      const res = await post(url, init, { accept: 'application/json', ...auth });
      assert.equal(res.status, 200, res.text);
      const headers = { ...auth, 'mcp-session-id': String(res.headers['mcp-session-id']), 'mcp-protocol-version': '2025-06-18' };
      const note = await post(url, { jsonrpc: '2.0', method: 'notifications/initialized' }, headers);
      assert.equal(note.status, 202, note.text);
      return headers;
    }

    /**
     * A legacy request POSTed with Accept: text/event-stream only. The proxy opens the stream before it forwards,
     * queues or refuses the request, in the same turn: once the headers are in, that is decided.
     */
    async function legacyStream(t: TestContext, url: string, headers: Record<string, string>, msg: Json): Promise<SseStream> {
      const stream = await openRpcStream(url, { method: 'POST', headers: { 'content-type': 'application/json', ...headers, accept: 'text/event-stream' }, body: JSON.stringify(msg) });
      onCleanup(t, () => stream.close());
      assert.equal(stream.res.statusCode, 200, `${msg.method} is answered with a stream`);
      return stream;
    }

    /** The outcomes of the fixture's requests, from the answer of an 'ask' call: [{id, result|error}]. */
    const outcomesOf = (res: RawResponse): Json => {
      const m = onlyMessage(res);
      assert.equal(m.result?.resultType, 'complete', res.text);
      return JSON.parse(textOf(m.result));
    };

    it('1. a child\'s answer that comes while the client holds input_required is given to the retry under the retry\'s id (not the first request\'s)', { timeout: 15_000 }, async (t) => {
      const { url, lines } = await mrtrProxy(t, 'rv-late-id');
      const args = { what: 'late' };
      const first = await modernPost(url, 'first-id', 'tools/call', { name: 'do', arguments: args }, { caps: SAMPLING });
      const r = onlyMessage(first);
      assert.equal(r.id, 'first-id', first.text);
      assert.equal(r.result?.resultType, 'input_required', first.text);
      // The child answers the call without the input; its answer is in before the list's (one stdout, in order).
      const released = await modernPost(url, 'release', 'tools/list', { cursor: 'release' });
      assert.equal(released.status, 200, released.text);
      const key = Object.keys(r.result.inputRequests)[0]!;
      const retry = await within(modernPost(url, 'retry-id', 'tools/call', { name: 'do', arguments: args, requestState: r.result.requestState, inputResponses: { [key]: sampled('too late') } }, { caps: SAMPLING }), 5_000, 'the retry');
      assert.equal(retry.status, 200, retry.text);
      const answer = onlyMessage(retry);
      assert.equal(answer.id, 'retry-id', `the kept answer is sent under the retry's id: ${retry.text}`);
      assert.equal(answer.result?.resultType, 'complete', retry.text);
      assert.equal(textOf(answer.result), 'answered without input');
      // The child's request, still open, is told the call ended; the client's late answer never reaches it.
      const told = await waitFor(() => lines(`response ${JSON.stringify(key)} `)[0], 5_000, 'an answer to the child\'s request');
      assert.match(told, /"error":/, told);
    });

    it('2. an ask that comes when no call holds the lane (its call has ended) is refused to the child with -32601 and never reaches a legacy session whose tools/list is in flight', { timeout: 15_000 }, async (t) => {
      const { url, lines } = await mrtrProxy(t, 'rv-no-holder');
      // Y: a legacy session that can sample, with its GET stream and a tools/list the child holds (on its own stream).
      const y = await legacyHeaders(url, SAMPLING);
      const yGet = await openRpcStream(url, { headers: { ...y, accept: 'text/event-stream' } });
      onCleanup(t, () => yGet.close());
      assert.equal(yGet.res.statusCode, 200);
      const yList = await legacyStream(t, url, y, { jsonrpc: '2.0', id: 'y-list', method: 'tools/list', params: { cursor: 'hold' } });
      // X: a modern call whose child answers it and then, in the same write, asks.
      const x = await modernPost(url, 'x', 'tools/call', { name: 'do', arguments: { what: 'then-ask' } }, { caps: SAMPLING });
      assert.equal(textOf(onlyMessage(x).result), 'done', x.text);
      // The list is answered after the child's request (one stdout, in order): Y's streams have had their chance.
      const released = await modernPost(url, 'release', 'tools/list', { cursor: 'release' });
      assert.equal(released.status, 200, released.text);
      const listed = await nextMessage(yList, (m) => m.id === 'y-list', 5_000, 'the answer to Y\'s tools/list');
      assert.ok(Array.isArray(listed.result?.tools), JSON.stringify(listed));
      const leaked = [...streamMessages(yList), ...streamMessages(yGet)].filter((m) => m.method !== undefined);
      assert.deepEqual(leaked, [], 'X\'s request reached Y');
      const refused = await waitFor(() => lines('response "then-ask" ')[0], 5_000, 'the proxy to answer the child\'s request');
      assert.match(refused, /"error":\{"code":-32601,/, refused);
    });

    it('3. an ask the child sends between rounds (after the round went out, while the client holds input_required) is asked in the next round: the call is not cancelled and completes', { timeout: 15_000 }, async (t) => {
      const { url, lines } = await mrtrProxy(t, 'rv-between');
      const args = { what: 'ask' };
      const callWith = (id: number, extra: Json) => modernPost(url, id, 'tools/call', { name: 'do', arguments: args, ...extra }, { caps: SAMPLING });
      const first = await callWith(1, {});
      const r1 = onlyMessage(first).result;
      assert.equal(r1?.resultType, 'input_required', first.text);
      const [k1, ...none] = Object.keys(r1.inputRequests);
      assert.deepEqual(none, [], first.text);
      // The child asks once more now, long after the gather window (it answers the list 150 ms after asking).
      const more = await modernPost(url, 'more', 'tools/list', { cursor: 'more' });
      assert.equal(more.status, 200, more.text);
      assert.equal(lines('asked ').length, 2, lines('asked ').join(' | '));
      const second = await within(callWith(2, { requestState: r1.requestState, inputResponses: { [k1!]: sampled('first') } }), 5_000, 'the first retry');
      const r2 = onlyMessage(second).result;
      assert.equal(r2?.resultType, 'input_required', `the later request is asked in a second round: ${second.text}`);
      const keys2 = Object.keys(r2.inputRequests);
      assert.equal(keys2.length, 1, second.text);
      assert.notEqual(keys2[0], k1);
      const done = await within(callWith(3, { requestState: r2.requestState, inputResponses: { [keys2[0]!]: sampled('second') } }), 5_000, 'the second retry');
      assert.deepEqual(outcomesOf(done), [{ id: k1, result: sampled('first') }, { id: keys2[0], result: sampled('second') }]);
      assert.deepEqual(lines('cancelled '), [], 'the call was cancelled on the child');
    });

    it('4. progress the child reports after a round reaches the retry under the retry\'s own progressToken (not the first request\'s)', { timeout: 15_000 }, async (t) => {
      const { url } = await mrtrProxy(t, 'rv-progress');
      const args = { what: 'progress' };
      const progressOf = (res: RawResponse) => messages(res).filter((m) => m.method === 'notifications/progress').map((m) => [m.params.progressToken, m.params.progress]);
      const first = await modernPost(url, 1, 'tools/call', { name: 'do', arguments: args }, { caps: SAMPLING, meta: { progressToken: 'tok-first' } });
      assert.equal(first.status, 200, first.text);
      assert.deepEqual(progressOf(first), [['tok-first', 1]], first.text);
      const r1 = messages(first).at(-1).result;
      assert.equal(r1?.resultType, 'input_required', first.text);
      const key = Object.keys(r1.inputRequests)[0]!;
      const retry = await within(modernPost(url, 2, 'tools/call', { name: 'do', arguments: args, requestState: r1.requestState, inputResponses: { [key]: sampled('p') } }, { caps: SAMPLING, meta: { progressToken: 'tok-retry' } }), 5_000, 'the retry');
      assert.equal(retry.status, 200, retry.text);
      assert.deepEqual(progressOf(retry), [['tok-retry', 2], ['tok-retry', 3]], retry.text);
      const last = messages(retry).at(-1);
      assert.equal(last.id, 2, retry.text);
      assert.equal(last.result?.resultType, 'complete', retry.text);
    });

    it('5a. requests whose clients left hold no place in the lane queue: with maxLaneQueue 64 (the per-credential share) filled by one credential\'s requests whose connections then closed, another credential\'s request is queued, not refused, and runs once the lane is free', { timeout: 30_000 }, async (t) => {
      // maxPendingPerSession 1: a session's ping is refused (429) exactly while a request of its own waits for the lane.
      const { url, lines } = await mrtrProxy(t, 'rv-lane-dead', { tokens: [TOKEN_A, TOKEN_B], limits: { ...FAST, maxLaneQueue: 64, maxPendingPerSession: 1 } });
      const waitsForLane = async (headers: Record<string, string>) => (await post(url, ping('probe'), headers)).status === 429;
      const held = await holdLane(url, AUTH_A);
      const sessions = await Promise.all(Array.from({ length: 64 }, () => legacyHeaders(url, {}, AUTH_A)));
      const queued = await Promise.all(sessions.map((s, i) => legacyStream(t, url, s, call(i, { what: 'echo', text: `gone ${i}` }))));
      for (const s of sessions) assert.ok(await waitsForLane(s), 'each of A\'s requests waits for the lane');
      for (const stream of queued) stream.close();
      const b = await legacyHeaders(url, {}, AUTH_B);
      // Until the proxy has seen the connections close, B may still be refused; then it is queued.
      let attempts = 0;
      const bStream = await waitFor(async () => {
        const stream = await legacyStream(t, url, b, call(`b-${++attempts}`, { what: 'echo', text: 'from B' }));
        if (await waitsForLane(b)) return stream;
        const refusal = await nextMessage(stream, (m) => m.id === `b-${attempts}`, 5_000, 'the refusal of B\'s request');
        assert.match(String(refusal.error?.message), /Too many requests waiting/, JSON.stringify(refusal));
        return null;
      }, 3_000, 'B\'s request to be queued behind requests whose clients left');
      assert.equal(onlyMessage(await held.finish()).result?.resultType, 'complete');
      const answered = await nextMessage(bStream, (m) => m.id === `b-${attempts}`, 5_000, 'the answer to B\'s request');
      assert.equal(textOf(answered.result), 'from B', JSON.stringify(answered));
      assert.deepEqual(lines('call ').filter((l) => l.includes('"gone ')), [], 'a request whose client left reached the child');
    });

    it('5b. one credential holds at most maxLaneQueuePerCredential (64) places in the lane queue: its 65th request is refused, another credential\'s is queued and runs', { timeout: 30_000 }, async (t) => {
      const { url } = await mrtrProxy(t, 'rv-lane-share', { tokens: [TOKEN_A, TOKEN_B] });
      const held = await holdLane(url, AUTH_A);
      const a = await legacyHeaders(url, {}, AUTH_A);
      const queued = await Promise.all(Array.from({ length: 64 }, (_, i) => legacyStream(t, url, a, call(i, { what: 'echo', text: `a ${i}` }))));
      const over = await within(modernPost(url, 'a-65', 'tools/call', { name: 'do', arguments: { what: 'echo', text: 'a 65' } }, { headers: AUTH_A }), 5_000, 'A\'s 65th request to be refused');
      const refusal = onlyMessage(over);
      assert.equal(refusal.id, 'a-65', over.text);
      assert.equal(refusal.error?.code, -32000, over.text);
      assert.match(refusal.error.message, /Too many requests waiting/);
      const b = await legacyHeaders(url, {}, AUTH_B);
      const bStream = await legacyStream(t, url, b, call('b', { what: 'echo', text: 'from B' }));
      assert.equal(onlyMessage(await held.finish()).result?.resultType, 'complete');
      const answered = await nextMessage(bStream, (m) => m.id === 'b', 10_000, 'the answer to B\'s request');
      assert.equal(textOf(answered.result), 'from B', JSON.stringify(answered));
      for (const [i, stream] of queued.entries()) {
        const m = await nextMessage(stream, (msg) => msg.id === i, 10_000, `the answer to A's request ${i}`);
        assert.equal(textOf(m.result), `a ${i}`);
      }
    });

    it('6. a legacy notifications/cancelled for a request still waiting for the lane: the client gets -32800 and the request never reaches the child', { timeout: 15_000 }, async (t) => {
      const { url, lines } = await mrtrProxy(t, 'rv-cancel-queued');
      const held = await holdLane(url);
      const s = await legacyHeaders(url);
      const get = await openRpcStream(url, { headers: { ...s, accept: 'text/event-stream' } });
      onCleanup(t, () => get.close());
      assert.equal(get.res.statusCode, 200);
      const victim = await legacyStream(t, url, s, call(42, { what: 'echo', text: 'cancelled while queued' }));
      const cancel = await post(url, { jsonrpc: '2.0', method: 'notifications/cancelled', params: { requestId: 42, reason: 'user pressed stop' } }, s);
      assert.equal(cancel.status, 202, cancel.text);
      const both = () => [...streamMessages(victim), ...streamMessages(get)];
      const cancelled = await waitFor(() => both().find((m) => m.id === 42), 5_000, 'the answer to the cancelled request');
      assert.equal(cancelled.error?.code, -32800, JSON.stringify(cancelled));
      // Queued behind it: once this one has run, the cancelled one would have run before it.
      const behind = await legacyStream(t, url, s, call(43, { what: 'echo', text: 'queued behind' }));
      assert.equal(onlyMessage(await held.finish()).result?.resultType, 'complete');
      const answered = await nextMessage(behind, (m) => m.id === 43, 5_000, 'the answer to the request queued behind');
      assert.equal(textOf(answered.result), 'queued behind');
      assert.deepEqual(lines('call ').filter((l) => l.includes('cancelled while queued')), [], 'the cancelled request reached the child');
      assert.equal(both().filter((m) => m.id === 42).length, 1, JSON.stringify(both()));
    });

    it('7. requests that gave up waiting for a starting child (503 after startWaitMs) leave nothing behind: their timers are garbage once they are answered', { timeout: 20_000 }, async (t) => {
      // What a leftover waiter holds cannot be seen over HTTP; its timer can be, through a WeakRef and a full GC.
      const START_WAIT_MS = 321; // no other timer of the proxy has this duration
      const h = await harness(t, { servers: [fixture('slow', 'noinit')] }, { limits: { ...FAST, startWaitMs: START_WAIT_MS, initTimeoutMs: 60_000 } });
      v8.setFlagsFromString('--expose-gc');
      const gc = vm.runInNewContext('gc') as () => void;
      const timers: WeakRef<object>[] = [];
      const realSetTimeout = globalThis.setTimeout;
      globalThis.setTimeout = ((fn: (...args: unknown[]) => void, ms?: number, ...rest: unknown[]) => {
        const timer = realSetTimeout(fn, ms, ...rest);
        if (ms === START_WAIT_MS) timers.push(new WeakRef(timer));
        return timer;
      }) as typeof setTimeout;
      let answers: RawResponse[];
      try {
        answers = await within(Promise.all([1, 2, 3, 4, 5].map((id) => modernPost(`${h.url}/slow/mcp`, id, 'server/discover', {}))), 10_000, 'server/discover while the child starts');
      } finally {
        globalThis.setTimeout = realSetTimeout;
      }
      for (const res of answers) assert.equal(res.status, 503, res.text);
      assert.equal(h.proxy.status().slow!.state, 'starting');
      assert.equal(timers.length, 5, 'each request waited on a timer of startWaitMs');
      await waitFor(() => {
        gc();
        return timers.every((ref) => ref.deref() === undefined);
      }, 5_000, 'the timers of the requests that gave up to be collected');
    });

    it('8. an input request whose child id is "__proto__" is asked (a fresh call\'s empty inputResponses), asked again (a retry\'s empty inputResponses), and answered only with what the client gives under that key', { timeout: 15_000 }, async (t) => {
      const { url, lines } = await mrtrProxy(t, 'rv-proto');
      const args = { what: 'ask', asks: [{ id: '__proto__', method: 'sampling/createMessage', params: { messages: [{ role: 'user', content: { type: 'text', text: 'proto?' } }], maxTokens: 1 } }] };
      const callWith = (id: number, extra: Json) => modernPost(url, id, 'tools/call', { name: 'do', arguments: args, ...extra }, { caps: SAMPLING });
      const first = await callWith(1, { inputResponses: {} });
      const r1 = onlyMessage(first).result;
      assert.equal(r1?.resultType, 'input_required', `nothing was offered for "__proto__": ${first.text}`);
      assert.deepEqual(Object.keys(r1.inputRequests), ['__proto__']);
      const again = await within(callWith(2, { requestState: r1.requestState, inputResponses: {} }), 5_000, 'a retry answering nothing');
      const r2 = onlyMessage(again).result;
      assert.equal(r2?.resultType, 'input_required', `asked again: ${again.text}`);
      assert.deepEqual(Object.keys(r2.inputRequests), ['__proto__']);
      assert.deepEqual(lines('response '), [], 'the child got an answer the client never gave');
      // A computed "__proto__" key is an own property, sent as such.
      const done = await within(callWith(3, { requestState: r2.requestState, inputResponses: { ['__proto__']: sampled('proto answer') } }), 5_000, 'the retry answering it');
      assert.deepEqual(outcomesOf(done), [{ id: '__proto__', result: sampled('proto answer') }]);
      assert.equal(lines('response ').length, 1, lines('response ').join(' | '));
    });

    it('10a. listen streams: one credential may hold maxListenersPerCredential (32) on a server; the next gets 429 with its id, another credential still opens one, and one closed makes room', { timeout: 30_000 }, async (t) => {
      const log = path.join(tmpDir('rv-listeners'), 'fixture.log');
      const h = await harness(t, { servers: [listenFixture('lc', { tools: { listChanged: true } }, log)] }, { limits: FAST, tokens: [TOKEN_A, TOKEN_B] });
      await h.proxy.ready(10_000);
      const url = `${h.url}/lc/mcp`;
      const streams: SseStream[] = [];
      for (let i = 0; i < 32; i++) streams.push(await listenStream(t, url, `a-${i}`, { toolsListChanged: true }, AUTH_A));
      await Promise.all(streams.map((s) => ackOf(s)));
      const listenBody = (id: string) => ({ jsonrpc: '2.0', id, method: 'subscriptions/listen', params: { notifications: { toolsListChanged: true }, _meta: modernMeta() } });
      const listenHeaders = { 'mcp-protocol-version': MODERN, 'mcp-method': 'subscriptions/listen' };
      const over = await within(post(url, listenBody('a-32'), { ...listenHeaders, ...AUTH_A }), 5_000, 'the 33rd listen stream of one credential to be refused');
      const err = assertRpcError(over, 429, -32000);
      assert.equal(err.id, 'a-32');
      assert.ok(over.headers['retry-after'], 'Retry-After');
      const other = await listenStream(t, url, 'b-0', { toolsListChanged: true }, AUTH_B);
      assert.deepEqual((await ackOf(other)).params.notifications, { toolsListChanged: true });
      streams[0]!.close();
      // Once the proxy has seen it close, the credential may open one again.
      const again = await waitFor(async () => {
        const stream = await openRpcStream(url, { method: 'POST', headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream', ...listenHeaders, ...AUTH_A }, body: JSON.stringify(listenBody('a-again')) });
        onCleanup(t, () => stream.close());
        return stream.res.statusCode === 200 ? stream : (stream.close(), null);
      }, 5_000, 'a listen stream once one of the credential\'s was closed');
      await ackOf(again);
    });

    it('10b. subscribed URIs: at maxSubscribedUrisPerChild (4096) distinct URIs on a child a listen stream naming a new one gets 503, a legacy resources/subscribe of a new one an error; URIs already subscribed are still taken, and a stream closed makes room', { timeout: 60_000 }, async (t) => {
      const log = path.join(tmpDir('rv-uris'), 'fixture.log');
      const h = await harness(t, { servers: [listenFixture('subs', { tools: {}, resources: { subscribe: true } }, log)] }, { limits: FAST });
      await h.proxy.ready(10_000);
      const url = `${h.url}/subs/mcp`;
      const uri = (i: number, j: number) => `test://uris/${i}/${j}`;
      // 16 streams of maxSubscriptionsPerSession (256) distinct URIs each: 4096.
      const streams: SseStream[] = [];
      for (let i = 0; i < 16; i++) {
        streams.push(await listenStream(t, url, `l-${i}`, { resourceSubscriptions: Array.from({ length: 256 }, (_, j) => uri(i, j)) }));
        assert.equal((await ackOf(streams[i]!)).params.notifications.resourceSubscriptions?.length, 256);
      }
      const listenHeaders = { 'mcp-protocol-version': MODERN, 'mcp-method': 'subscriptions/listen' };
      const listen = (id: string, uris: string[]) => post(url, { jsonrpc: '2.0', id, method: 'subscriptions/listen', params: { notifications: { resourceSubscriptions: uris }, _meta: modernMeta() } }, listenHeaders);
      const over = await within(listen('new-uri', [uri(0, 0), 'test://uris/new']), 5_000, 'a listen stream naming one more URI to be refused');
      const err = assertRpcError(over, 503, -32000);
      assert.equal(err.id, 'new-uri');
      assert.match(err.error.message, /Too many resources subscribed/);
      const known = await listenStream(t, url, 'known', { resourceSubscriptions: [uri(3, 7)] });
      assert.deepEqual((await ackOf(known)).params.notifications.resourceSubscriptions, [uri(3, 7)]);
      // A legacy session shares the child's count.
      const sid = await rawSession(h.url, 'subs');
      const subscribe = (id: number, u: string) => post(url, { jsonrpc: '2.0', id, method: 'resources/subscribe', params: { uri: u } }, sessionHeaders(sid));
      const refused = onlyMessage(await within(subscribe(1, 'test://uris/legacy'), 5_000, 'a legacy subscribe of a new URI'));
      assert.equal(refused.error?.code, -32000, JSON.stringify(refused));
      assert.match(refused.error.message, /Too many resources subscribed/);
      const shared = onlyMessage(await within(subscribe(2, uri(5, 5)), 5_000, 'a legacy subscribe of a URI already subscribed'));
      assert.deepEqual(shared.result, {}, JSON.stringify(shared));
      assert.equal(fileLines(log).filter((l) => l === 'subscribe test://uris/new' || l === 'subscribe test://uris/legacy').length, 0, 'a refused URI reached the child');
      streams[15]!.close();
      const room = await waitFor(async () => {
        const stream = await openRpcStream(url, { method: 'POST', headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream', ...listenHeaders }, body: JSON.stringify({ jsonrpc: '2.0', id: 'room', method: 'subscriptions/listen', params: { notifications: { resourceSubscriptions: ['test://uris/new'] }, _meta: modernMeta() } }) });
        onCleanup(t, () => stream.close());
        return stream.res.statusCode === 200 ? stream : (stream.close(), null);
      }, 5_000, 'room for a new URI once a stream was closed');
      assert.deepEqual((await ackOf(room)).params.notifications.resourceSubscriptions, ['test://uris/new']);
    });

    it('11. the proxy\'s own request that cannot be written (the child\'s input queue is full) leaves nothing pending: it never times out into a "request given up on", so input requests keep working', { timeout: 30_000 }, async (t) => {
      // requestTimeoutMs ≤ sessionIdleMs: once the sweep has ended a session last active after the subscribe, a
      // pending subscribe would have timed out in that sweep or an earlier one.
      const { h, url, lines } = await mrtrProxy(t, 'rv-own-write', { limits: { ...FAST, maxChildQueueBytes: 64 * KIB, requestTimeoutMs: 1_000, sessionIdleMs: 1_000, sweepIntervalMs: 50 } });
      const stalled = await modernPost(url, 'stall', 'tools/call', { name: 'do', arguments: { what: 'stall' } });
      assert.equal(textOf(onlyMessage(stalled).result), 'stalled', stalled.text);
      // 3 MiB for a child that reads nothing: far more than a pipe holds, so its input queue is past 64 KiB.
      const filler = await legacyHeaders(url);
      const big = await post(url, { jsonrpc: '2.0', method: 'notifications/filler', params: { data: 'x'.repeat(3 * MIB) } }, filler);
      assert.equal(big.status, 202, big.text);
      const uri = 'test://own/never-written';
      const stream = await listenStream(t, url, 'listen', { resourceSubscriptions: [uri] });
      assert.deepEqual((await ackOf(stream)).params.notifications.resourceSubscriptions, [uri]);
      process.kill(h.proxy.status().fix!.pid!, 'SIGUSR2');
      await waitFor(() => lines('note notifications/filler').length, 10_000, 'the child to read its input again');
      const marker = await legacyHeaders(url);
      assert.ok(marker['mcp-session-id']);
      await waitFor(() => h.proxy.status().fix!.sessions === 0, 10_000, 'the sweep to end the idle sessions');
      assert.deepEqual(lines(`subscribe ${uri}`), [], 'the subscribe was written after all: this test did not fill the child\'s input queue');
      const received = new Set(lines('got ').map((l) => l.split(' ')[1]));
      const strange = lines('cancelled ').filter((l) => !received.has(l.slice('cancelled '.length)));
      assert.deepEqual(strange, [], 'the child was told to cancel a request it never got');
      const asking = await within(modernPost(url, 'asking', 'tools/call', { name: 'do', arguments: { what: 'ask' } }, { caps: SAMPLING }), 5_000, 'an asking call');
      assert.equal(onlyMessage(asking).result?.resultType, 'input_required', `the child's request is asked, not refused: ${asking.text}`);
    });
  });
});

// The official conformance suite (@modelcontextprotocol/conformance, `server` command) run against the proxy,
// with conformance/child.mjs (a legacy 2025-11-25 stdio server, SDK 1.x) as its one shared child. Scored =
// the `server:` list of the package's requirements/<revision>.yaml: each scored scenario must have run with no
// FAILURE check; warnings and unscored scenarios are reported as diagnostics only.

const CONFORMANCE_PKG = path.join(HERE, 'node_modules', '@modelcontextprotocol', 'conformance');
const CONFORMANCE_CLI = path.join(CONFORMANCE_PKG, 'dist', 'index.js');
const CONFORMANCE_CHILD = path.join(HERE, 'conformance', 'child.mjs');
/** Node 20 lacks fs.globSync, which the CLI imports; the hook supplies it (a no-op on Node 22+). */
const NODE20_HOOK = pathToFileURL(path.join(HERE, 'conformance', 'node20-fs-glob.mjs')).href;
/** One whole suite run: about 10 s on a quiet machine (most of it the scenarios' own waits). */
const SUITE_TIMEOUT_MS = 150_000;

type Check = { id: string; name?: string; status: string; errorMessage?: string };
type ScenarioResult = { scenario: string; checks: Check[] };

/** The scenarios a revision's conformance is scored on: the `server:` list of requirements/<revision>.yaml. */
function scoredServerScenarios(revision: string): string[] {
  const yaml = fs.readFileSync(path.join(CONFORMANCE_PKG, 'requirements', `${revision}.yaml`), 'utf8');
  const list: string[] = [];
  let inServer = false;
  for (const line of yaml.split('\n')) {
    if (/^\S/.test(line)) inServer = /^server:\s*$/.test(line); // a top-level key starts or ends the list
    else if (inServer) {
      const m = /^\s+-\s+([\w.-]+)\s*$/.exec(line);
      if (m) list.push(m[1]!);
    }
  }
  assert.ok(list.length > 10, `requirements/${revision}.yaml lists the scored server scenarios (${list.length})`);
  return list;
}

/** `-o DIR` holds one server-<scenario>-<ISO time> directory per scenario run, each with its checks.json. */
function readResults(dir: string): Map<string, ScenarioResult> {
  const results = new Map<string, ScenarioResult>();
  for (const entry of fs.readdirSync(dir)) {
    const m = /^server-(.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$/.exec(entry);
    const file = path.join(dir, entry, 'checks.json');
    if (!m || !fs.existsSync(file)) continue;
    results.set(m[1]!, { scenario: m[1]!, checks: JSON.parse(fs.readFileSync(file, 'utf8')) as Check[] });
  }
  return results;
}

/**
 * Runs `conformance server --url URL --requirements REVISION -o OUT` in its own process group, bounded by
 * SUITE_TIMEOUT_MS (then the group is killed and the run fails). Resolves with the exit code and output.
 */
function runSuite(url: string, revision: string, out: string, spawned: Set<number>): Promise<{ code: number | null; signal: string | null; output: string; ms: number }> {
  const started = Date.now();
  const cli = spawn(NODE, ['--import', NODE20_HOOK, CONFORMANCE_CLI, 'server', '--url', url, '--requirements', revision, '-o', out], {
    cwd: HERE, stdio: ['ignore', 'pipe', 'pipe'], detached: true, env: { ...process.env, NO_COLOR: '1' },
  });
  if (cli.pid) spawned.add(cli.pid);
  let output = '';
  cli.stdout!.setEncoding('utf8').on('data', (s: string) => void (output += s));
  cli.stderr!.setEncoding('utf8').on('data', (s: string) => void (output += s));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      killGroup(cli.pid);
      reject(new Error(`conformance ${revision} did not finish within ${SUITE_TIMEOUT_MS} ms; output tail:\n${output.slice(-3000)}`));
    }, SUITE_TIMEOUT_MS);
    cli.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    cli.on('close', (code, signal) => {
      clearTimeout(timer);
      if (cli.pid) spawned.delete(cli.pid);
      resolve({ code, signal, output, ms: Date.now() - started });
    });
  });
}

function killGroup(pid: number | undefined): void {
  if (!pid) return;
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    // ESRCH: already gone
  }
}

/** Asserts every scored scenario ran with no FAILURE check; reports the rest as diagnostics. */
function assertScored(t: TestContext, revision: string, run: { code: number | null; signal: string | null; output: string; ms: number }, out: string, proxyLog: string[]): void {
  const scored = scoredServerScenarios(revision);
  const results = readResults(out);
  const problems: string[] = [];
  let clean = 0;
  for (const scenario of scored) {
    const result = results.get(scenario);
    if (!result) {
      problems.push(`${scenario}: did not run (no checks.json)`);
      continue;
    }
    const failed = result.checks.filter((c) => c.status === 'FAILURE');
    if (failed.length === 0) clean++;
    for (const c of failed) problems.push(`${scenario} :: ${c.id}: ${(c.errorMessage ?? '').slice(0, 400)}`);
  }
  const summary = `${revision}: ${clean}/${scored.length} scored scenarios without a FAILURE check, in ${(run.ms / 1000).toFixed(1)} s (CLI exit ${run.code ?? run.signal})`;
  t.diagnostic(summary);
  for (const [scenario, { checks }] of results) {
    const count = (s: string) => checks.filter((c) => c.status === s).length;
    t.diagnostic(`${scored.includes(scenario) ? 'scored  ' : 'unscored'} ${scenario}: ${count('SUCCESS')} ok, ${count('FAILURE')} failed, ${count('WARNING')} warnings`);
    for (const c of checks.filter((x) => x.status === 'FAILURE' || x.status === 'WARNING')) {
      t.diagnostic(`    ${c.status} ${c.id}: ${(c.errorMessage ?? '').slice(0, 300)}`);
    }
  }
  const proxyTrouble = proxyLog.filter((l) => l.startsWith('error') || l.startsWith('warn')).slice(-20);
  assert.deepEqual(problems, [],
    `${summary}\nfailing checks:\n  ${problems.join('\n  ')}\n` +
    `proxy warnings/errors (last 20):\n  ${proxyTrouble.join('\n  ') || '(none)'}\n` +
    `CLI output tail:\n${run.output.slice(-2000)}`);
}

describe('8. MCP 2026-07-28: the conformance suite against a legacy child', () => {
  let proxy: RunningProxy | null = null;
  const proxyLog: string[] = [];
  const spawned = new Set<number>();
  const dirs: string[] = [];
  let url = '';
  const tmp = (what: string) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), `rmp-conformance-${what}-`));
    dirs.push(dir);
    return dir;
  };

  before(async () => {
    const log: ReturnType<typeof captureLog> = {
      error: (scope, text) => void proxyLog.push(`error [${scope}] ${text}`),
      warn: (scope, text) => void proxyLog.push(`warn [${scope}] ${text}`),
      info: (scope, text) => void proxyLog.push(`info [${scope}] ${text}`),
      debug: () => {},
      enabled: (level) => level !== 'debug',
    };
    proxy = await startProxy({
      servers: [{
        name: 'conf', command: NODE, args: [CONFORMANCE_CHILD], env: {}, sessions: 'shared',
        clientCapabilities: ['sampling', 'elicitation', 'roots'], secrets: [],
      }],
    }, { port: 0, log, stateDir: tmp('state'), limits: { continuationTtlMs: 2000 } }); // stateDir: the requestState key file
    await proxy.ready(20_000);
    url = `${proxy.url}/conf/mcp`;
  });

  after(async () => {
    for (const pid of spawned) killGroup(pid);
    await proxy?.close();
    for (const dir of dirs) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('--requirements 2026-07-28: every scored server scenario passes through the proxy (sessionless path, input_required bridged from the child\'s legacy requests)', { timeout: SUITE_TIMEOUT_MS + 10_000 }, async (t) => {
    const out = tmp('2026-07-28');
    const run = await runSuite(url, '2026-07-28', out, spawned);
    assertScored(t, '2026-07-28', run, out, proxyLog);
  });

  it('--requirements 2025-11-25 on the same URL: every scored server scenario passes (legacy sessions, sampling/elicitation routed to the session)', { timeout: SUITE_TIMEOUT_MS + 10_000 }, async (t) => {
    const out = tmp('2025-11-25');
    const run = await runSuite(url, '2025-11-25', out, spawned);
    assertScored(t, '2025-11-25', run, out, proxyLog);
  });
});

// ── 9. Operator controls: tool policy, request timeouts, rate limits, audit log ────────────────────────────────────────────

describe('9. Operator controls: tool policy, request timeouts, rate limits, audit log', () => {
  it('per-server "requestTimeoutMs": that server\'s unanswered call gets -32003 and the child a notifications/cancelled (its mapping released: a late answer goes nowhere); another server keeps the proxy-wide limit', { timeout: 30_000 }, async (t) => {
    const log = path.join(tmpDir('timeout'), 'log');
    const h = await harness(t, { servers: [fixture('quick', 'ok', { requestTimeoutMs: 1_000, env: { FIXTURE_LOG: log } }), fixture('patient')] },
      { limits: { ...FAST, sweepIntervalMs: 50, requestTimeoutMs: 60_000 } });
    await h.proxy.ready(10_000);
    const quick = await h.client('quick', 'mcp');
    const patient = await h.client('patient', 'mcp');
    const slow = patient.callTool({ name: 'do', arguments: { what: 'slow', ms: 2_000 } });
    const started = Date.now();
    await assert.rejects(quick.callTool({ name: 'do', arguments: { what: 'hang' } }), (err: Error & { code?: number }) => err.code === -32003);
    assert.ok(Date.now() - started >= 1_000, 'not before its requestTimeoutMs');
    const hung = fileLines(log).find((l) => l.startsWith('hang '))!.slice(5);
    await waitFor(() => fileLines(log).includes(`cancelled ${hung}`), 5_000, 'the cancel on the child');
    assert.equal(textOf(await slow), 'slow done'); // 2 s > 1 s: the other server's call was not timed out
    assert.equal(textOf(await quick.callTool({ name: 'do', arguments: { what: 'echo', text: 'ok' } })), 'ok');
    assert.match(parseConfig(JSON.stringify({ mcpServers: { s: { command: 'x', requestTimeoutMs: 10 } } }), 'c.json').errors[0]!,
      /^c\.json: mcpServers\.s\.requestTimeoutMs: got number, expected an integer from 1000 to 86400000 \(milliseconds\)$/);
  });

  it('"tools" is validated at load, naming the server and the field: allow with deny, an unknown key (a typo must not expose everything), names that are not non-empty strings, readOnly not a boolean', () => {
    const r = parseConfig(JSON.stringify({ mcpServers: {
      both: { command: 'x', tools: { allow: ['a'], deny: ['b'] } },
      typo: { command: 'x', tools: { alow: ['a'] } },
      names: { command: 'x', tools: { deny: ['a', 3, ''] } },
      ro: { command: 'x', tools: { readOnly: 'yes' } },
      list: { command: 'x', tools: ['a'] },
      fine: { command: 'x', tools: { deny: ['a'], readOnly: true } },
    } }), 'c.json');
    assert.equal(r.config, null);
    const errors = r.errors.join('\n');
    assert.match(errors, /^c\.json: mcpServers\.both\.tools: "allow" and "deny" together; use one/m);
    assert.match(errors, /^c\.json: mcpServers\.typo\.tools\."alow": unknown key; expected "allow", "deny" or "readOnly"$/m);
    assert.match(errors, /^c\.json: mcpServers\.names\.tools\.deny: got array, expected an array of tool names \(non-empty strings\)$/m);
    assert.match(errors, /^c\.json: mcpServers\.ro\.tools\.readOnly: got string.*, expected a boolean$/m);
    assert.match(errors, /^c\.json: mcpServers\.list\.tools: got array, expected an object/m);
    assert.doesNotMatch(errors, /mcpServers\.fine/);
    const fine = parseConfig(JSON.stringify({ mcpServers: { fine: { command: 'x', tools: { deny: ['a'], readOnly: true } } } }), 'c.json');
    assert.deepEqual(fine.config!.servers[0]!.tools, { deny: ['a'], readOnly: true });
  });

  it('"allow" on server-everything: every transport and revision lists only the allowed tools, and a call to another is -32602 without reaching the child', { timeout: 60_000 }, async (t) => {
    const h = await harness(t, { servers: [everything('ev')].map((s) => ({ ...s, tools: { allow: ['echo', 'get-sum'] } })) }, { limits: FAST });
    await h.proxy.ready(20_000);
    const names = (list: { tools: { name: string }[] }) => list.tools.map((tool) => tool.name).sort();
    const stream = await h.client('ev', 'mcp');
    const sse = await h.client('ev', 'sse');
    const { client: v2 } = await v2Client(t, `${h.url}/ev/mcp`, 'pin');
    for (const client of [stream, sse]) {
      assert.deepEqual(names(await client.listTools()), ['echo', 'get-sum']);
      assert.equal(textOf(await client.callTool({ name: 'echo', arguments: { message: 'hi' } })), 'Echo: hi');
      await assert.rejects(client.callTool({ name: 'toggle-simulated-logging', arguments: {} }), (err: Error & { code?: number }) => {
        assert.equal(err.code, -32602);
        assert.match(err.message, /tool policy does not allow it/);
        return true;
      });
    }
    assert.deepEqual(names(await v2.listTools() as Json), ['echo', 'get-sum']);
    await assert.rejects(v2.callTool({ name: 'toggle-simulated-logging', arguments: {} }), /tool policy does not allow it/);
    // Raw 2026-07-28: the answer keeps its stamping (resultType, ttl) after filtering.
    const raw = await postModern(`${h.url}/ev/mcp`, modernMsg(9, 'tools/list'));
    const body = JSON.parse(raw.text);
    assert.equal(raw.status, 200, raw.text);
    assert.deepEqual(body.result.tools.map((tool: Json) => tool.name).sort(), ['echo', 'get-sum']);
    assert.equal(body.result.resultType, 'complete');
    assert.equal(body.id, 9);
  });

  it('"deny" hides the named tools and refuses their calls before the child (the fixture logs every call it gets); batches too', { timeout: 30_000 }, async (t) => {
    const log = path.join(tmpDir('policy'), 'log');
    const h = await harness(t, { servers: [fixture('fix', 'ok', { env: { FIXTURE_LOG: log }, tools: { deny: ['do'] } })] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const client = await h.client('fix', 'mcp');
    assert.deepEqual((await client.listTools()).tools, []);
    await assert.rejects(client.callTool({ name: 'do', arguments: { what: 'hang' } }), /tool policy does not allow it/);
    const sid = await rawSession(h.url, 'fix', '2025-03-26');
    const batch = await post(`${h.url}/fix/mcp`, [call(1, { what: 'hang' }), { jsonrpc: '2.0', id: 2, method: 'tools/call', params: { name: 'other', arguments: { what: 'echo', text: 'ok' } } }],
      { ...sessionHeaders(sid), 'mcp-protocol-version': '2025-03-26', accept: 'application/json' });
    const answers = JSON.parse(batch.text);
    assert.ok(Array.isArray(answers), batch.text);
    assert.deepEqual(answers.find((a: Json) => a.id === 1).error, { code: -32602, message: 'Tool not available: this server\'s tool policy does not allow it' });
    assert.equal(answers.find((a: Json) => a.id === 2).result.content[0].text, 'ok');
    assert.ok(!fileLines(log).some((line) => line.startsWith('hang ')), 'a denied call reached the child');
    // Counted: the SDK call and the one in the batch.
    assert.match((await request(`${h.url}/metrics`)).text, /^mcp_proxy_tool_calls_blocked_total\{server="fix"\} 2$/m);
  });

  it('"readOnly" on server-everything exposes only tools annotated readOnlyHint: true, judges a call before any tools/list (annotations learned at start), and follows a reload that turns it off, in place', { timeout: 60_000 }, async (t) => {
    const ev = { ...everything('ev'), tools: { readOnly: true } };
    const h = await harness(t, { servers: [ev] }, { limits: FAST });
    await h.proxy.ready(20_000);
    const client = await h.client('ev', 'mcp');
    // No tools/list yet on this session: the proxy's own list at start decides.
    await assert.rejects(client.callTool({ name: 'toggle-simulated-logging', arguments: {} }), /tool policy does not allow it/);
    assert.equal(textOf(await client.callTool({ name: 'echo', arguments: { message: 'ro' } })), 'Echo: ro');
    const listed = (await client.listTools()).tools;
    assert.ok(listed.length >= 3, JSON.stringify(listed.map((tool) => tool.name)));
    for (const tool of listed) assert.equal(tool.annotations?.readOnlyHint, true, tool.name);
    assert.ok(!listed.some((tool) => tool.name === 'toggle-simulated-logging'));
    const pid = h.proxy.status().ev!.pid;
    const diff = await h.proxy.reload({ servers: [{ ...ev, tools: undefined }] });
    assert.deepEqual(diff!.updated.map((server) => server.name), ['ev']);
    assert.equal(h.proxy.status().ev!.pid, pid);
    assert.ok((await client.listTools()).tools.some((tool) => tool.name === 'toggle-simulated-logging'));
    await client.callTool({ name: 'toggle-simulated-logging', arguments: {} });
  });
  describe('the hostile review of the tool policy and the operations pages, finding by finding', () => {
    /**
     * A child whose tools/list answers are the env LISTS (a JSON array of lists: the first answer gets the first,
     * later ones the next, the last repeats), each DELAY ms late; tools/call answers "called NAME", and a call
     * of "next" also says notifications/tools/list_changed.
     */
    const LIST_CHILD = `${STDIN_LINES}
const send = (m) => process.stdout.write(JSON.stringify(m) + '\\n');
const lists = JSON.parse(process.env.LISTS);
let n = 0;
function onMessage(msg) {
  if (msg.method === 'initialize') return send({ jsonrpc: '2.0', id: msg.id, result: { protocolVersion: '2025-11-25', capabilities: { tools: { listChanged: true } }, serverInfo: { name: 'lists', version: '1' } } });
  if (msg.method === 'tools/list') { const list = lists[Math.min(n++, lists.length - 1)]; return setTimeout(() => send({ jsonrpc: '2.0', id: msg.id, result: { tools: list } }), Number(process.env.DELAY || 0)); }
  if (msg.method === 'tools/call') {
    if (msg.params.name === 'next') send({ jsonrpc: '2.0', method: 'notifications/tools/list_changed' });
    return send({ jsonrpc: '2.0', id: msg.id, result: { content: [{ type: 'text', text: 'called ' + JSON.stringify(msg.params.name) }] } });
  }
  if (msg.id !== undefined) send({ jsonrpc: '2.0', id: msg.id, result: {} });
}
process.stdin.on('end', () => process.exit(0));`;
    const tool = (name: string, readOnlyHint: boolean) => ({ name, inputSchema: { type: 'object' }, annotations: { readOnlyHint } });
    const listChild = (name: string, lists: unknown[][], extra: Partial<ServerConfig> = {}, delayMs = 0) =>
      srv(name, ['-e', LIST_CHILD], { env: { LISTS: JSON.stringify(lists), DELAY: String(delayMs) }, tools: { readOnly: true }, ...extra });

    // T1, T2. A name that is not a string, and a tools/call sent without an id, reached the child.
    it('T1 T2 under a policy, a tools/call whose name is not a string is refused, and a tools/call sent as a notification never reaches the child', { timeout: 30_000 }, async (t) => {
      const log = path.join(tmpDir('t1'), 'log');
      const h = await harness(t, { servers: [fixture('fix', 'ok', { tools: { deny: ['do'] }, env: { FIXTURE_LOG: log } })] }, { limits: FAST });
      await h.proxy.ready(10_000);
      const sid = await rawSession(h.url, 'fix');
      const odd = await post(`${h.url}/fix/mcp`, { jsonrpc: '2.0', id: 1, method: 'tools/call', params: { name: ['do'], arguments: { what: 'hang' } } }, sessionHeaders(sid));
      assert.deepEqual(JSON.parse(odd.text).error, { code: -32602, message: 'Tool not available: this server\'s tool policy does not allow it' });
      const note = await post(`${h.url}/fix/mcp`, { jsonrpc: '2.0', method: 'tools/call', params: { name: 'other', arguments: { what: 'hang' } } }, sessionHeaders(sid));
      assert.equal(note.status, 202);
      const seen = await post(`${h.url}/fix/mcp`, { jsonrpc: '2.0', id: 2, method: 'tools/call', params: { name: 'other', arguments: { what: 'seen' } } }, sessionHeaders(sid));
      assert.deepEqual(JSON.parse(answerText(seen)).hung, [], 'a call reached the child');
      assert.ok(!fileLines(log).some((l) => l.startsWith('hang ')));
    });

    // T3. The proxy's own tools/list (readOnly) was timed out by requestTimeoutMs: the server never became ready.
    it('T3 a readOnly server whose tools/list is slower than requestTimeoutMs still becomes ready (the proxy\'s own requests are not timed out)', { timeout: 30_000 }, async (t) => {
      const h = await harness(t, { servers: [listChild('ro', [[tool('r', true)]], { requestTimeoutMs: 1_000 }, 1_500)] }, { limits: { ...FAST, sweepIntervalMs: 50 } });
      await h.proxy.ready(10_000);
      const client = await h.client('ro', 'mcp');
      assert.equal(textOf(await client.callTool({ name: 'r', arguments: {} })), 'called "r"');
    });

    // T4, T5. Hints only grew (a tool the server dropped stayed callable; past 10,000 names new ones were refused);
    // a name listed twice was judged by its last entry.
    it('T4 T5 a complete re-listing replaces what the proxy knew (a dropped tool is refused); a name listed twice is read-only only if every entry says so', { timeout: 30_000 }, async (t) => {
      const lists = [
        [tool('a', true), tool('next', true), tool('del', false), tool('del', true)],
        [tool('b', true), tool('next', true)],
      ];
      const h = await harness(t, { servers: [listChild('ro', lists)] }, { limits: FAST });
      await h.proxy.ready(10_000);
      const client = await h.client('ro', 'mcp');
      await assert.rejects(client.callTool({ name: 'del', arguments: {} }), /tool policy does not allow it/);
      assert.equal(textOf(await client.callTool({ name: 'a', arguments: {} })), 'called "a"');
      assert.equal(textOf(await client.callTool({ name: 'next', arguments: {} })), 'called "next"'); // list_changed: the proxy lists again
      await waitFor(async () => (await client.callTool({ name: 'b', arguments: {} }).then(() => true, () => false)), 5_000, 'b, from the new list');
      await assert.rejects(client.callTool({ name: 'a', arguments: {} }), /tool policy does not allow it/);
    });

    // T6. A policy changed by a reload told no client.
    it('T6 a reload that changes a server\'s tool policy sends its sessions notifications/tools/list_changed', { timeout: 30_000 }, async (t) => {
      const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
      await h.proxy.ready(10_000);
      const client = await h.client('fix', 'sse');
      let told = 0;
      client.setNotificationHandler(ToolListChangedNotificationSchema, () => void told++);
      await h.proxy.reload({ servers: [fixture('fix', 'ok', { tools: { deny: ['do'] } })] });
      await waitFor(() => told === 1, 5_000, 'notifications/tools/list_changed');
      assert.deepEqual((await client.listTools()).tools, []);
    });

    // M1. Without auth on a public bind, a DNS-rebinding page could read /metrics and the status page.
    it('M1 without auth on a non-loopback bind, /metrics and / answer 403 (Host is not checked there); /mcp still serves', { timeout: 30_000 }, async (t) => {
      const h = await harness(t, { servers: [fixture('fix')] }, { host: '0.0.0.0', allowUnauthenticated: true, limits: FAST });
      await h.proxy.ready(10_000);
      const base = `http://127.0.0.1:${h.proxy.port}`;
      for (const page of ['/metrics', '/']) {
        const res = await request(`${base}${page}`, { headers: { host: `rebind.example:${h.proxy.port}` } });
        assert.equal(res.status, 403, `${page}: ${res.text.slice(0, 100)}`);
        assert.match(JSON.parse(res.text).error.message, /set a token/);
      }
      assert.equal((await post(`${base}/fix/mcp`, initMsg(), { accept: 'application/json' })).status, 200);
    });

    // M2. A server whose name holds a control character never had its problems shown on the status page.
    it('M2 the status page shows the recent problems of a server whose name holds a tab', { timeout: 30_000 }, async (t) => {
      const h = await harness(t, { servers: [srv('tab\there', [], { command: '/nonexistent/no-such-program' })] }, { limits: FAST });
      await waitFor(() => h.proxy.status()['tab\there']?.state === 'errored', 10_000, 'the server to give up');
      const page = await request(`${h.url}/`);
      assert.equal(page.status, 200);
      assert.match(page.text, /cannot start &#34;\/nonexistent\/no-such-program&#34;: ENOENT/);
    });
  });

  describe('rate limits per credential', () => {
    const A = 'rate-token-a-0123456789';
    const B = 'rate-token-b-0123456789';

    it('"rateLimit": each credential has its own bucket per server; over it, 429 with Retry-After and a JSON-RPC error carrying the id, before the child (Streamable, batches, legacy SSE); it refills with time', { timeout: 30_000 }, async (t) => {
      const log = path.join(tmpDir('rate'), 'log');
      // One token every 2 s: the steps below take far less than that, even on a loaded machine.
      const h = await harness(t, { servers: [fixture('fix', 'ok', { rateLimit: { requestsPerMinute: 30, burst: 3 }, env: { FIXTURE_LOG: log } })] }, { tokens: [A, B], limits: FAST });
      await h.proxy.ready(10_000);
      const base = h.url;
      const init = async (token: string) => {
        const res = await post(`${base}/fix/mcp`, initMsg(0, '2025-03-26'), { accept: 'application/json', ...bearer(token) });
        assert.equal(res.status, 200, res.text);
        return String(res.headers['mcp-session-id']);
      };
      const a = await init(A); // 1 of A's 3
      const echo = (sid: string, token: string, id: number) => post(`${base}/fix/mcp`, call(id, { what: 'echo', text: `e${id}` }), { ...sessionHeaders(sid), 'mcp-protocol-version': '2025-03-26', ...bearer(token) });
      assert.equal(answerText(await echo(a, A, 1)), 'e1');
      assert.equal(answerText(await echo(a, A, 2)), 'e2');
      const over = await echo(a, A, 3);
      assert.equal(over.status, 429, over.text);
      assert.match(String(over.headers['retry-after']), /^[12]$/); // 30 a minute: one more within 2 s
      assert.deepEqual(JSON.parse(over.text), { jsonrpc: '2.0', id: 3, error: { code: -32000, message: 'Too many requests: this credential is over its rate limit for this server; retry later' } });
      assert.ok(!fileLines(log).some((l) => l.includes('e3')), 'the refused call reached the child');
      // B has its own bucket.
      const b = await init(B);
      assert.equal(answerText(await echo(b, B, 4)), 'e4');
      // A batch larger than what is left is refused whole (id null).
      const batch = await post(`${base}/fix/mcp`, [call(5, { what: 'echo', text: 'x' }), call(6, { what: 'echo', text: 'y' })], { ...sessionHeaders(b), 'mcp-protocol-version': '2025-03-26', ...bearer(B) });
      assert.equal(batch.status, 429, batch.text);
      assert.equal(JSON.parse(batch.text).id, null);
      // Notifications are free.
      assert.equal((await post(`${base}/fix/mcp`, { jsonrpc: '2.0', method: 'notifications/initialized' }, { ...sessionHeaders(a), ...bearer(A) })).status, 202);
      // Refilled: 30 a minute is one every 2 s.
      await waitFor(async () => (await echo(a, A, 7)).status === 200, 5_000, 'the bucket to refill');
      // Legacy SSE: opening the stream or a POST to /messages gets the 429 once B's bucket is empty.
      await assert.rejects((async () => {
        const sse = await h.client('fix', 'sse', bearer(B));
        for (let i = 0; i < 4; i++) await sse.callTool({ name: 'do', arguments: { what: 'echo', text: 'burst' } });
      })(), /429/);
      const metrics = (await request(`${base}/metrics`, { headers: bearer(A) })).text;
      assert.ok(Number(/^mcp_proxy_rate_limited_total\{server="fix"\} (\d+)$/m.exec(metrics)?.[1]) >= 3, metrics.split('\n').filter((l) => l.includes('rate_limited')).join('\n'));
      assert.match(parseConfig(JSON.stringify({ mcpServers: { s: { command: 'x', rateLimit: { requestsPerMinute: 0, burst: 'many' } } } }), 'c.json').errors.join('\n'),
        /mcpServers\.s\.rateLimit\.requestsPerMinute: got number, expected an integer from 1 to 1000000\n.*mcpServers\.s\.rateLimit\.burst: got string/);
    });

    it('the token and revocation endpoints are limited per client address (tokenRequestsPerMinute): over it 429 slow_down with Retry-After; another address is not affected', { timeout: 20_000 }, async (t) => {
      const op = await oauthProxy(t, { servers: [fixture('alpha')] }, { limits: { tokenRequestsPerMinute: 3 } });
      const guess = (endpoint: string, localAddress?: string) => postForm(`${op.base}/${endpoint}`, { grant_type: 'authorization_code', code: 'guess', client_id: 'nobody', token: 'x' }, {}, localAddress);
      for (const endpoint of ['token', 'token', 'revoke']) assert.equal((await guess(endpoint)).status, 401);
      const over = await guess('token');
      assert.equal(over.status, 429, over.text);
      assert.equal(over.headers['retry-after'], '60');
      assert.equal(JSON.parse(over.text).error, 'slow_down');
      assert.equal((await guess('revoke')).status, 429);
      assert.equal((await guess('token', '127.0.0.2')).status, 401, 'another address has its own budget');
    });


    it('maxSessionsPerCredential: at its cap a credential\'s own least recently active idle session gives way, never another credential\'s; anonymous clients are not rate limited', { timeout: 30_000 }, async (t) => {
      const h = await harness(t, { servers: [fixture('fix')] }, { tokens: [A, B], limits: { ...FAST, maxSessionsPerCredential: 2 } });
      await h.proxy.ready(10_000);
      const init = async (token: string) => {
        const res = await post(`${h.url}/fix/mcp`, initMsg(), { accept: 'application/json', ...bearer(token) });
        assert.equal(res.status, 200, res.text);
        return String(res.headers['mcp-session-id']);
      };
      const alive = async (sid: string, token: string) => (await post(`${h.url}/fix/mcp`, ping(1), { ...sessionHeaders(sid), ...bearer(token) })).status === 200;
      const b1 = await init(B);
      const a1 = await init(A);
      const a2 = await init(A);
      const a3 = await init(A); // A at its cap: a1 (its least recently active) gives way
      assert.deepEqual([await alive(a1, A), await alive(a2, A), await alive(a3, A), await alive(b1, B)], [false, true, true, true]);
      // Anonymous (no tokens configured) is not rate limited: far more than the default burst goes through.
      const open = await harness(t, { servers: [fixture('fix', 'ok', { rateLimit: { requestsPerMinute: 1, burst: 1 } })] }, { limits: FAST });
      await open.proxy.ready(10_000);
      const sid = await rawSession(open.url, 'fix');
      for (let i = 0; i < 5; i++) assert.equal((await post(`${open.url}/fix/mcp`, ping(i), sessionHeaders(sid))).status, 200);
    });
  });

  describe('the hostile review of the rate limits and the audit log, finding by finding', () => {
    const A = 'review-token-a-0123456789';

    // F2, G7, G1, G6. A batch larger than the burst was refused for ever (told to retry); a server given only a
    // rate kept the global burst of 200; legacy GET /sse opened sessions past the limit; 429s left no audit line.
    it('F2 G7 G1 G6 a batch larger than the burst goes when the bucket is full; a rate alone sets the burst; GET /sse takes a token; a rate-limited tools/call is audited', { timeout: 30_000 }, async (t) => {
      const file = path.join(tmpDir('rl-review'), 'audit.log');
      const h = await harness(t, { servers: [fixture('big', 'ok', { rateLimit: { requestsPerMinute: 6_000, burst: 3 } }), fixture('slow', 'ok', { rateLimit: { requestsPerMinute: 1 } })] },
        { tokens: [A], auditLog: file, limits: FAST });
      await h.proxy.ready(10_000);
      const init = async (server: string) => {
        const res = await post(`${h.url}/${server}/mcp`, initMsg(0, '2025-03-26'), { accept: 'application/json', ...bearer(A) });
        assert.equal(res.status, 200, res.text);
        return String(res.headers['mcp-session-id']);
      };
      const big = await init('big'); // 1 of 3
      // Refilled to 3 within 30 ms (6,000 a minute); a batch of 4 then goes, into debt.
      const batch = [1, 2, 3, 4].map((i) => call(i, { what: 'echo', text: `b${i}` }));
      const res = await waitFor(async () => {
        const r = await post(`${h.url}/big/mcp`, batch, { ...sessionHeaders(big), 'mcp-protocol-version': '2025-03-26', ...bearer(A) });
        return r.status === 200 ? r : null;
      }, 3_000, 'the batch of 4 with a burst of 3');
      assert.equal(JSON.parse(res.text).length, 4);
      // {"requestsPerMinute": 1}: a burst of 1, not 200. The initialize takes it; the call after is refused.
      const slow = await init('slow');
      const refused = await post(`${h.url}/slow/mcp`, call(7, { what: 'echo', text: 'x' }), { ...sessionHeaders(slow), ...bearer(A) });
      assert.equal(refused.status, 429, refused.text);
      const sse = await request(`${h.url}/slow/sse`, { headers: { accept: 'text/event-stream', ...bearer(A) } });
      assert.equal(sse.status, 429, 'GET /sse over the limit');
      const lines = fileLines(file).map((l) => JSON.parse(l));
      assert.ok(lines.some((e) => e.event === 'tool_call' && e.server === 'slow' && e.outcome === 'rate limited'), fileLines(file).join('\n'));
    });

    // F4. A child answer with both result and error (or neither) was skipped: its request waited out requestTimeoutMs.
    it('F4 a child line naming a request in flight but holding both result and error is answered -32603 at once', { timeout: 20_000 }, async (t) => {
      const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, requestTimeoutMs: 60_000 } });
      await h.proxy.ready(10_000);
      const sid = await rawSession(h.url, 'fix');
      const res = await within(post(`${h.url}/fix/mcp`, call(1, { what: 'raw', text: '{"jsonrpc":"2.0","id":$ID,"error":{"code":-32602,"message":"m"},"result":{}}' }), sessionHeaders(sid)), 5_000, 'the answer');
      assert.deepEqual(onlyMessage(res).error, { code: -32603, message: 'The MCP server answered with an invalid message' });
    });

    // G2, G3, G4, G5. The audit file kept a pre-existing 0644 mode; a FIFO as the audit log stalled the proxy; a
    // secret equal to a key garbled every line; U+2028 in a tool name split the line for some readers.
    it('G2 G3 G4 G5 the audit file is made 0600 whoever created it; a FIFO is refused; masking keeps the line\'s keys; U+2028 is escaped', { timeout: 20_000 }, async (t) => {
      const dir = tmpDir('audit-review');
      const fifo = path.join(dir, 'fifo');
      childProcess.execFileSync('mkfifo', [fifo]);
      await assert.rejects(startProxy({ servers: [] }, { host: '127.0.0.1', port: 0, logLevel: 'error', auditLog: fifo }), (err: ProxyError) => err.code === 'AUDIT_LOG' && /not a regular file|ENXIO/.test(err.message));
      const file = path.join(dir, 'audit.log');
      fs.writeFileSync(file, '', { mode: 0o644 });
      fs.chmodSync(file, 0o644);
      const h = await harness(t, { servers: [fixture('fix', 'ok', { secrets: ['event'] })] }, { auditLog: file, limits: FAST });
      await h.proxy.ready(10_000);
      assert.equal((fs.statSync(file).mode & 0o777).toString(8), '600');
      const client = await h.client('fix', 'mcp');
      await client.callTool({ name: 'do\u2028x', arguments: { what: 'echo', text: 'y' } });
      const text = fs.readFileSync(file, 'utf8');
      assert.ok(!text.includes('\u2028'), 'a raw U+2028 in the audit file');
      const calls = text.split('\n').filter(Boolean).map((l) => JSON.parse(l)).filter((e) => e.event === 'tool_call');
      assert.equal(calls.length, 1, text);
      assert.equal(calls[0].tool, 'do\u2028x');
    });
  });

  describe('audit log', () => {
    const auditLines = (file: string): Json[] => fileLines(file).map((line) => JSON.parse(line));

    it('--audit-log: one JSON line per session opened and closed and per tool call (ok, blocked by the policy, timed out), with credential id, server, tool, duration and outcome; never arguments, results, tokens or session ids', { timeout: 40_000 }, async (t) => {
      const file = path.join(tmpDir('audit'), 'audit.log');
      const token = 'audit-token-0123456789abcdef';
      const h = await harness(t, { servers: [fixture('fix', 'ok', { tools: { deny: ['secret-tool'] }, requestTimeoutMs: 1_000 })] },
        { tokens: ['another-token-0123456789', token], auditLog: file, limits: { ...FAST, sweepIntervalMs: 50 } });
      await h.proxy.ready(10_000);
      const client = await h.client('fix', 'mcp', bearer(token));
      const ARG = 'argument-value-that-must-not-be-logged';
      assert.equal(textOf(await client.callTool({ name: 'do', arguments: { what: 'echo', text: ARG } })), ARG);
      await assert.rejects(client.callTool({ name: 'secret-tool', arguments: { what: 'echo', text: ARG } }));
      await assert.rejects(client.callTool({ name: 'do', arguments: { what: 'hang' } }), (err: Error & { code?: number }) => err.code === -32003);
      const transport = client.transport as StreamableHTTPClientTransport;
      const sid = transport.sessionId!;
      await transport.terminateSession(); // DELETE
      await waitFor(() => auditLines(file).some((e) => e.event === 'session_close'), 5_000, 'the session_close line');
      const events = auditLines(file);
      for (const e of events) assert.equal(typeof e.time, 'string');
      const opened = events.find((e) => e.event === 'session_open');
      assert.deepEqual({ ...opened, time: 0 }, { time: 0, event: 'session_open', credential: 'token 2', server: 'fix', transport: 'streamable', session: opened.session });
      assert.match(opened.session, /^[0-9a-f]{16}$/);
      const calls = events.filter((e) => e.event === 'tool_call').map(({ time, durationMs, ...rest }) => (assert.equal(typeof durationMs, 'number'), rest));
      assert.deepEqual(calls, [
        { event: 'tool_call', credential: 'token 2', server: 'fix', tool: 'do', outcome: 'ok', transport: 'streamable', session: opened.session },
        { event: 'tool_call', credential: 'token 2', server: 'fix', tool: 'secret-tool', outcome: 'blocked by the tool policy', transport: 'streamable' },
        { event: 'tool_call', credential: 'token 2', server: 'fix', tool: 'do', outcome: 'timeout', transport: 'streamable', session: opened.session },
      ]);
      assert.deepEqual(events.filter((e) => e.event === 'session_close').map((e) => [e.session, e.reason]), [[opened.session, 'session ended']]);
      const text = fs.readFileSync(file, 'utf8');
      for (const secret of [ARG, token, sid]) assert.ok(!text.includes(secret), `the audit log holds ${secret}`);
      assert.equal((fs.statSync(file).mode & 0o777).toString(8), '600');
    });

    it('without --audit-log the events go to the log at info, scope "audit"; OAuth grants and revocations are audited by grant id, never a token', { timeout: 30_000 }, async (t) => {
      const op = await oauthProxy(t, { servers: [fixture('alpha')] });
      await op.h.proxy.ready(10_000);
      const grant = await oauthGrant(op.base);
      const sid = await oauthSession(op.base, 'alpha', grant.access);
      const revoke = await postForm(`${op.base}/revoke`, { token: grant.refresh, client_id: grant.client.client_id, client_secret: grant.client.client_secret ?? '' });
      assert.equal(revoke.status, 200, revoke.text);
      const audits = op.lines.filter((l) => l.startsWith('info [audit] ')).map((l) => JSON.parse(l.slice('info [audit] '.length)));
      const granted = audits.find((e) => e.event === 'grant');
      assert.ok(granted, op.lines.join('\n'));
      assert.equal(granted.audience, 'alpha');
      assert.match(granted.credential, /^oauth:/);
      assert.ok(audits.some((e) => e.event === 'session_open' && e.credential === granted.credential && e.server === 'alpha'), JSON.stringify(audits));
      assert.deepEqual(audits.filter((e) => e.event === 'revoke').map((e) => [e.credential, e.reason]), [[granted.credential, 'revoked by its client']]);
      const all = op.lines.join('\n');
      for (const secret of [grant.access, grant.refresh, sid]) assert.ok(!all.includes(secret), 'a token or session id reached the log');
    });
  });
});

// ── 10. OAuth helpers ───────────────────────────────────────────────────────────────────────────────────
//
// A real proxy on a port picked before listening (the public URL must be known first), the official SDK's
// client-side OAuth (auth() through an OAuthClientProvider, in both client transports), and a raw client that
// behaves as Claude.ai is reported to. The consent form is submitted as a person would: GET the page, read the
// hidden csrf field, POST the passphrase, follow the 303.

const PASSPHRASE = 'correct horse battery staple';
/** A redirect URI nobody listens on (the discard port): raw flows read the code from the 303's Location. */
const OAUTH_CALLBACK = 'http://127.0.0.1:9/callback';
const CLAUDE_CALLBACK = 'https://claude.ai/api/mcp/auth_callback';
const FORM = { 'content-type': 'application/x-www-form-urlencoded' };
const STATE_FILE_NAME = 'oauth-state.json';
/** The state file's format (2 since e28b5de: several access and refresh tokens per grant). */
const STATE_FILE_VERSION = 2;

/** A proxy with OAuth on: its public URL is http://127.0.0.1:PORT, known before it listens. */
type OAuthProxy = {
  h: Harness;
  port: number;
  base: string;
  stateDir: string;
  /** Every log line, at every level. */
  lines: string[];
  /** SDK clients to close before the proxy. */
  clients: Client[];
  options: OAuthProxyOptions;
  stop(): Promise<void>;
};

type OAuthProxyOptions = {
  limits?: Partial<Limits>;
  stateDir?: string;
  port?: number;
  baseDomain?: string;
  tokens?: string[];
  /** Extra startProxy options (e.g. a pre-registered client). */
  extra?: Partial<NonNullable<StartOptions>>;
};

async function oauthProxy(t: TestContext, config: Config, o: OAuthProxyOptions = {}): Promise<OAuthProxy> {
  const port = o.port ?? (await freePort());
  const stateDir = o.stateDir ?? tmpDir('oauth');
  const lines: string[] = [];
  const h = await startHarness(config, {
    port,
    publicUrl: `http://127.0.0.1:${port}`,
    passphrase: PASSPHRASE,
    stateDir,
    logLevel: 'error',
    log: captureLog(lines),
    baseDomain: o.baseDomain,
    tokens: o.tokens,
    limits: { ...FAST, ...o.limits },
    ...o.extra,
  });
  let stopped: Promise<void> | null = null;
  const op: OAuthProxy = {
    h, port, base: `http://127.0.0.1:${port}`, stateDir, lines, clients: [], options: { ...o, port, stateDir },
    stop: () =>
      (stopped ??= (async () => {
        await Promise.allSettled(op.clients.map((c) => c.close()));
        await h.stop();
      })()),
  };
  t.after(() => op.stop());
  return op;
}

/** Stops a proxy and starts it again on the same port with the same state directory and options. */
async function oauthRestart(t: TestContext, op: OAuthProxy, config: Config): Promise<OAuthProxy> {
  await op.stop();
  return oauthProxy(t, config, op.options);
}

type OAuthResponse = RawResponse & { json: Json };

function withJson(res: RawResponse): OAuthResponse {
  let json: Json;
  try {
    json = JSON.parse(res.text);
  } catch {
    json = undefined;
  }
  return { ...res, json };
}

function postForm(url: string, params: Record<string, string>, headers: Record<string, string> = {}, localAddress?: string): Promise<RawResponse> {
  return request(url, { method: 'POST', headers: { ...FORM, ...headers }, body: new URLSearchParams(params).toString(), localAddress });
}

/** Asserts an RFC 6749 §5.2 error answer: status, `error`, no-store, and no token in it. */
function assertOAuthError(res: OAuthResponse, status: number, error: string): void {
  assert.equal(res.status, status, `status (body: ${res.text})`);
  assert.equal(res.json?.error, error, `OAuth error (body: ${res.text})`);
  assert.equal(typeof res.json.error_description, 'string');
  assert.equal(res.json.access_token, undefined);
  assert.equal(res.headers['cache-control'], 'no-store');
}

function oauthPkce(): { verifier: string; challenge: string } {
  const verifier = randomBytes(32).toString('base64url');
  return { verifier, challenge: createHash('sha256').update(verifier).digest('base64url') };
}

const OAUTH_CLIENT_DEFAULTS = {
  client_name: 'oauth test',
  redirect_uris: [OAUTH_CALLBACK],
  token_endpoint_auth_method: 'client_secret_post',
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
};

/** POST /register with JSON metadata (defaults: a confidential client_secret_post client on OAUTH_CALLBACK). */
async function oauthRegister(base: string, metadata: Json = {}, headers: Record<string, string> = {}): Promise<OAuthResponse> {
  const body = typeof metadata === 'string' ? metadata : JSON.stringify({ ...OAUTH_CLIENT_DEFAULTS, ...metadata });
  return withJson(await request(`${base}/register`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body }));
}

async function oauthClient(base: string, metadata: Json = {}): Promise<Json> {
  const res = await oauthRegister(base, metadata);
  assert.equal(res.status, 201, res.text);
  return res.json;
}

/** Authorization request parameters; null leaves one out. */
type AuthorizeOptions = {
  server?: string;
  resource?: string | null;
  redirectUri?: string | null;
  state?: string | null;
  challenge?: string | null;
  method?: string | null;
  responseType?: string | null;
};

function oauthAuthorizeUrl(base: string, clientId: string, challenge: string, o: AuthorizeOptions = {}): string {
  const params: Record<string, string | null> = {
    response_type: o.responseType === undefined ? 'code' : o.responseType,
    client_id: clientId,
    redirect_uri: o.redirectUri === undefined ? OAUTH_CALLBACK : o.redirectUri,
    code_challenge: o.challenge === undefined ? challenge : o.challenge,
    code_challenge_method: o.method === undefined ? 'S256' : o.method,
    state: o.state === undefined ? 'st-123' : o.state,
    resource: o.resource === undefined ? `${base}/${o.server ?? 'alpha'}/mcp` : o.resource,
  };
  const url = new URL(`${base}/authorize`);
  for (const [key, value] of Object.entries(params)) if (value !== null) url.searchParams.set(key, value);
  return url.href;
}

/** The hidden csrf field of a consent page, or null. */
function consentCsrf(page: RawResponse): string | null {
  return /<input type="hidden" name="csrf" value="([^"]+)">/.exec(page.text)?.[1] ?? null;
}

/** POSTs the consent form as the browser would (same origin, form-encoded), from `localAddress` if given. */
function consentSubmit(base: string, csrf: string, passphrase = PASSPHRASE, extra: Record<string, string> = {}, headers: Record<string, string> = {}, localAddress?: string): Promise<RawResponse> {
  return postForm(`${base}/authorize`, { csrf, passphrase, action: 'approve', ...extra }, { origin: base, ...headers }, localAddress);
}

/** Opens a consent page (from `localAddress` if given) that must show the form; returns its csrf token. */
async function consentOpen(url: string, localAddress?: string): Promise<string> {
  const page = await request(url, { localAddress });
  assert.equal(page.status, 200, `consent page (body: ${page.text})`);
  const csrf = consentCsrf(page);
  assert.ok(csrf, 'the consent page carries a csrf field');
  return csrf;
}

/** The code in a consent answer: a 303 to OAUTH_CALLBACK. */
function consentCode(answer: RawResponse): string {
  assert.equal(answer.status, 303, `consent answer (body: ${answer.text})`);
  const location = new URL(String(answer.headers.location));
  assert.equal(`${location.origin}${location.pathname}`, OAUTH_CALLBACK);
  const code = location.searchParams.get('code');
  assert.ok(code, `a code in ${location.href}`);
  return code;
}

/** An HTML error page of the consent endpoint: status, no redirect, the message (HTML-escaped) in it, no form. */
function assertConsentErrorPage(res: RawResponse, status: number, message: string): void {
  assert.equal(res.status, status, `status (location: ${res.headers.location}; body: ${res.text.slice(0, 300)})`);
  assert.equal(res.headers.location, undefined);
  assert.match(String(res.headers['content-type']), /^text\/html/);
  const escaped = message.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&#39;');
  assert.ok(res.text.includes(`<p class="err">${escaped}</p>`), `page says ${JSON.stringify(message)} (body: ${res.text.slice(-400)})`);
  assert.equal(consentCsrf(res), null);
}

/** What a person does: opens the consent page, types the passphrase, approves. Returns the 303's Location. */
async function consentApprove(base: string, authorizeUrl: string, passphrase = PASSPHRASE, extra: Record<string, string> = {}): Promise<{ page: RawResponse; answer: RawResponse; location: URL; csrf: string }> {
  const page = await request(authorizeUrl);
  assert.equal(page.status, 200, `consent page (body: ${page.text})`);
  const csrf = consentCsrf(page);
  assert.ok(csrf, 'the consent page carries a csrf field');
  const answer = await consentSubmit(base, csrf, passphrase, extra);
  assert.equal(answer.status, 303, `consent answer (body: ${answer.text})`);
  return { page, answer, location: new URL(String(answer.headers.location)), csrf };
}

type OAuthCode = { code: string; verifier: string; challenge: string; resource: string; location: URL };

/** A code for `client`, approved by the operator (resource: the server's /mcp endpoint unless given). */
async function oauthCode(base: string, client: Json, o: AuthorizeOptions & { all?: boolean } = {}): Promise<OAuthCode> {
  const { verifier, challenge } = oauthPkce();
  const url = oauthAuthorizeUrl(base, client.client_id, challenge, o);
  const { location } = await consentApprove(base, url, PASSPHRASE, o.all ? { all: 'on' } : {});
  const code = location.searchParams.get('code');
  assert.ok(code, `a code in ${location.href}`);
  return { code, verifier, challenge, resource: new URL(url).searchParams.get('resource') ?? '', location };
}

type ClientAuth = 'post' | 'basic' | 'none';

/** POST /token (form-encoded) authenticated as `client` with client_secret_post, _basic or only its id. */
async function oauthToken(base: string, client: Json, params: Record<string, string>, how: ClientAuth = 'post'): Promise<OAuthResponse> {
  const form = { ...params };
  const headers: Record<string, string> = {};
  if (how === 'basic') {
    const pair = `${encodeURIComponent(client.client_id)}:${encodeURIComponent(client.client_secret ?? '')}`;
    headers.authorization = `Basic ${Buffer.from(pair).toString('base64')}`;
  } else {
    form.client_id = client.client_id;
    if (how === 'post' && client.client_secret !== undefined) form.client_secret = client.client_secret;
  }
  return withJson(await postForm(`${base}/token`, form, headers));
}

function oauthExchange(base: string, client: Json, c: OAuthCode, extra: Record<string, string> = {}, how: ClientAuth = 'post'): Promise<OAuthResponse> {
  return oauthToken(base, client, {
    grant_type: 'authorization_code', code: c.code, code_verifier: c.verifier, redirect_uri: OAUTH_CALLBACK,
    ...(c.resource ? { resource: c.resource } : {}), ...extra,
  }, how);
}

function oauthRefresh(base: string, client: Json, refreshToken: string, extra: Record<string, string> = {}): Promise<OAuthResponse> {
  return oauthToken(base, client, { grant_type: 'refresh_token', refresh_token: refreshToken, ...extra });
}

type OAuthGrant = { client: Json; code: OAuthCode; access: string; refresh: string; tokens: Json };

/** Register, consent, token: a live grant for `server` (fixture servers are called alpha and beta). */
async function oauthGrant(base: string, server = 'alpha', o: { register?: Json; all?: boolean; resource?: string | null } = {}): Promise<OAuthGrant> {
  const client = await oauthClient(base, o.register);
  const code = await oauthCode(base, client, { server, all: o.all, resource: o.resource });
  const res = await oauthExchange(base, client, code);
  assert.equal(res.status, 200, res.text);
  return { client, code, access: res.json.access_token, refresh: res.json.refresh_token, tokens: res.json };
}

function bearer(token: string): Record<string, string> {
  return { authorization: `Bearer ${token}` };
}

/**
 * What an endpoint makes of a token, without opening a session: a ping naming an unknown session is 404 with
 * a valid token, 401 with an invalid one, 403 with a token for another server.
 */
async function oauthProbe(base: string, token: string, server = 'alpha'): Promise<number> {
  const res = await post(`${base}/${server}/mcp`, ping(1), { ...bearer(token), 'mcp-session-id': 'no-such-session' });
  return res.status;
}

function oauthState(op: { stateDir: string }): Json {
  return JSON.parse(fs.readFileSync(path.join(op.stateDir, STATE_FILE_NAME), 'utf8'));
}

/** initialize with a bearer token over raw HTTP; returns the session id. */
async function oauthSession(base: string, server: string, token: string): Promise<string> {
  const res = await post(`${base}/${server}/mcp`, initMsg(0), { accept: 'application/json', ...bearer(token) });
  assert.equal(res.status, 200, res.text);
  const sid = res.headers['mcp-session-id'];
  assert.equal(typeof sid, 'string');
  return sid as string;
}

/** The parameters of a `WWW-Authenticate: Bearer k="v", …` header. */
function bearerParams(header: string | undefined): Record<string, string> {
  assert.ok(header, 'a WWW-Authenticate header');
  assert.match(header, /^Bearer /);
  const out: Record<string, string> = {};
  for (const m of header.matchAll(/([a-z_]+)="([^"]*)"/g)) out[m[1]] = m[2];
  return out;
}

/** An OAuthClientProvider that keeps everything in memory and counts what the SDK does with it. */
class SdkProvider implements OAuthClientProvider {
  info: OAuthClientInformationMixed | undefined;
  saved: OAuthTokens | undefined;
  readonly allTokens: OAuthTokens[] = [];
  readonly clientIds = new Set<string>();
  verifier = '';
  authUrl: URL | null = null;
  redirects = 0;
  lastState = '';

  constructor(
    readonly redirectUrl: string,
    readonly authMethod = 'client_secret_post',
  ) {}

  get clientMetadata(): OAuthClientMetadata {
    return {
      client_name: 'sdk oauth test', redirect_uris: [this.redirectUrl], grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'], token_endpoint_auth_method: this.authMethod,
    };
  }

  state(): string {
    this.lastState = `st-${randomBytes(8).toString('hex')}`;
    return this.lastState;
  }

  clientInformation(): OAuthClientInformationMixed | undefined {
    return this.info;
  }

  saveClientInformation(info: OAuthClientInformationMixed): void {
    this.info = info;
    this.clientIds.add(info.client_id);
  }

  tokens(): OAuthTokens | undefined {
    return this.saved;
  }

  saveTokens(tokens: OAuthTokens): void {
    this.saved = tokens;
    this.allTokens.push(tokens);
  }

  redirectToAuthorization(url: URL): void {
    this.authUrl = url;
    this.redirects++;
  }

  saveCodeVerifier(verifier: string): void {
    this.verifier = verifier;
  }

  codeVerifier(): string {
    return this.verifier;
  }

  invalidateCredentials(scope: 'all' | 'client' | 'tokens' | 'verifier' | 'discovery'): void {
    if (scope === 'all' || scope === 'client') this.info = undefined;
    if (scope === 'all' || scope === 'tokens') this.saved = undefined;
  }
}

/** A loopback listener standing in for a native client's redirect URI (RFC 8252): records what the browser brings. */
async function sdkCallback(t: TestContext): Promise<{ url: string; hits: URL[] }> {
  const hits: URL[] = [];
  const server = http.createServer((req, res) => {
    hits.push(new URL(req.url ?? '/', 'http://127.0.0.1'));
    res.writeHead(200, { 'content-type': 'text/plain' }).end('done, you can close this tab');
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => {
    server.closeAllConnections();
    server.close(() => resolve());
  }));
  return { url: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/callback`, hits };
}

type FetchFn = (input: string | URL | Request, init?: RequestInit) => Promise<Response>;

/**
 * A fetch for host routes: requests to *.mcp.test go to 127.0.0.1 on the same port with the Host header kept
 * (undici's fetch drops a Host header, so this goes through node:http). Streams bodies, honours abort.
 */
function hostRouteFetch(seen: string[]): FetchFn {
  return async (input, init = {}) => {
    const url = new URL(input instanceof Request ? input.url : String(input));
    if (!url.hostname.endsWith('.mcp.test')) return fetch(input, init);
    seen.push(`${init.method ?? 'GET'} ${url.host}${url.pathname}`);
    const headers: Record<string, string> = {};
    new Headers(init.headers).forEach((value, key) => {
      headers[key] = value;
    });
    headers.host = url.host;
    let body: string | Buffer | undefined;
    if (typeof init.body === 'string') body = init.body;
    else if (init.body instanceof URLSearchParams) {
      body = init.body.toString();
      headers['content-type'] ??= 'application/x-www-form-urlencoded';
    } else if (init.body != null) body = Buffer.from(init.body as ArrayBuffer);
    return new Promise<Response>((resolve, reject) => {
      const req = http.request({ host: '127.0.0.1', port: url.port, path: `${url.pathname}${url.search}`, method: init.method ?? 'GET', headers, agent: false }, (res) => {
        const pairs: [string, string][] = [];
        for (let i = 0; i < res.rawHeaders.length; i += 2) pairs.push([res.rawHeaders[i], res.rawHeaders[i + 1]]);
        const status = res.statusCode ?? 0;
        const empty = status === 204 || status === 304;
        if (empty) res.resume();
        resolve(new Response(empty ? null : (Readable.toWeb(res) as ReadableStream<Uint8Array>), { status, headers: pairs }));
      });
      req.on('error', reject);
      const signal = init.signal;
      if (signal) {
        const abort = () => {
          req.destroy();
          reject(new DOMException('This operation was aborted', 'AbortError'));
        };
        if (signal.aborted) return abort();
        signal.addEventListener('abort', abort, { once: true });
      }
      if (body !== undefined) req.write(body);
      req.end();
    });
  };
}

function sdkTransport(kind: 'mcp' | 'sse', url: URL, provider: SdkProvider, fetchFn?: FetchFn): StreamableHTTPClientTransport | SSEClientTransport {
  return kind === 'mcp'
    ? new StreamableHTTPClientTransport(url, { authProvider: provider, fetch: fetchFn })
    : new SSEClientTransport(url, { authProvider: provider, fetch: fetchFn });
}

/**
 * The SDK's client-side flow: connect → 401 → discovery → registration → redirect; a person approves on the
 * consent page and the browser follows the 303 to the loopback callback; finishAuth(code) → token; connect.
 */
async function sdkLogin(
  op: OAuthProxy, url: URL, kind: 'mcp' | 'sse', provider: SdkProvider, callback: { hits: URL[] }, fetchFn?: FetchFn,
): Promise<Client> {
  const refused = new Client({ name: 'oauth-test', version: '1.0.0' });
  const first = sdkTransport(kind, url, provider, fetchFn);
  await assert.rejects(refused.connect(first), UnauthorizedError);
  await first.close().catch(() => undefined);
  assert.ok(provider.authUrl, 'the SDK sent the user to the authorization endpoint');
  assert.equal(`${provider.authUrl.origin}${provider.authUrl.pathname}`, `${op.base}/authorize`);
  const { location } = await consentApprove(op.base, provider.authUrl.href);
  assert.ok(location.href.startsWith(provider.redirectUrl), `redirected to the registered URI, got ${location.href}`);
  const landed = await request(location.href); // the browser follows the 303
  assert.equal(landed.status, 200);
  const hit = callback.hits.at(-1);
  assert.ok(hit);
  assert.equal(hit.searchParams.get('state'), provider.lastState, 'state comes back unchanged');
  assert.equal(hit.searchParams.get('iss'), op.base, 'RFC 9207 iss is the issuer');
  const code = hit.searchParams.get('code');
  assert.ok(code);
  const transport = sdkTransport(kind, url, provider, fetchFn);
  await transport.finishAuth(code);
  const client = new Client({ name: 'oauth-test', version: '1.0.0' });
  op.clients.push(client);
  await client.connect(transport);
  return client;
}

/** Awaits one step of a flow; a failure names the step. */
async function sdkStep<T>(what: string, p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (err) {
    throw new Error(`${what} failed: ${(err as Error).message}`, { cause: err });
  }
}

/** The URL a route kind serves server "everything" at, for a transport. */
function sdkEndpoint(op: OAuthProxy, route: 'path' | 'host' | 'root', kind: 'mcp' | 'sse'): URL {
  if (route === 'path') return new URL(`${op.base}/everything/${kind}`);
  if (route === 'host') return new URL(`http://everything.mcp.test:${op.port}/${kind}`);
  return new URL(`${op.base}/${kind}`);
}

/** Claude.ai's connect, as mcp-protocol.md §7 reports it: raw HTTP, Accept "*∕*", no MCP-Protocol-Version. */
async function claudeConnect(base: string, endpoint: string): Promise<{ clientId: string; clientSecret: string; access: string; refresh: string; consent: RawResponse }> {
  const claudeHeaders = { 'content-type': 'application/json', accept: '*/*', origin: 'https://claude.ai', 'user-agent': 'Claude-User' };
  const init = JSON.stringify(initMsg(0, '2025-11-25'));
  // 1. The unauthenticated POST and its challenge.
  const first = await request(endpoint, { method: 'POST', headers: claudeHeaders, body: init });
  assert.equal(first.status, 401, first.text);
  const challenge = bearerParams(first.headers['www-authenticate'] as string);
  assert.equal(challenge.error, undefined);
  // 2. Protected resource metadata; `resource` must be exactly the pasted URL. 3. AS metadata at the root.
  const prm = withJson(await request(challenge.resource_metadata, { headers: { accept: 'application/json' } }));
  assert.equal(prm.status, 200);
  assert.equal(prm.json.resource, endpoint);
  const issuer = prm.json.authorization_servers[0];
  const as = withJson(await request(`${issuer}/.well-known/oauth-authorization-server`));
  assert.equal(as.status, 200);
  assert.equal(as.json.issuer, issuer);
  // 4. DCR from python-httpx, client_secret_post, Claude's callback.
  const reg = withJson(await request(as.json.registration_endpoint, {
    method: 'POST', headers: { 'content-type': 'application/json', 'user-agent': 'python-httpx/0.28.1' },
    body: JSON.stringify({ client_name: 'Claude', redirect_uris: [CLAUDE_CALLBACK], grant_types: ['authorization_code', 'refresh_token'], response_types: ['code'], token_endpoint_auth_method: 'client_secret_post' }),
  }));
  assert.equal(reg.status, 201, reg.text);
  // 5. Authorization with PKCE and resource; the operator approves.
  const { verifier, challenge: codeChallenge } = oauthPkce();
  const authorize = new URL(as.json.authorization_endpoint);
  for (const [k, v] of Object.entries({ response_type: 'code', client_id: reg.json.client_id, redirect_uri: CLAUDE_CALLBACK, code_challenge: codeChallenge, code_challenge_method: 'S256', state: 'claude-state', resource: endpoint })) {
    authorize.searchParams.set(k, v);
  }
  const { page, location } = await consentApprove(issuer, authorize.href);
  assert.equal(`${location.origin}${location.pathname}`, CLAUDE_CALLBACK);
  assert.equal(location.searchParams.get('state'), 'claude-state');
  // 6. The token, form-encoded, client_secret_post.
  const token = withJson(await postForm(as.json.token_endpoint, {
    grant_type: 'authorization_code', code: location.searchParams.get('code')!, code_verifier: verifier, redirect_uri: CLAUDE_CALLBACK,
    resource: endpoint, client_id: reg.json.client_id, client_secret: reg.json.client_secret,
  }));
  assert.equal(token.status, 200, token.text);
  assert.equal(token.json.token_type, 'Bearer');
  return { clientId: reg.json.client_id, clientSecret: reg.json.client_secret, access: token.json.access_token, refresh: token.json.refresh_token, consent: page };
}

/** One Claude.ai exchange: a fresh session (initialize, re-POSTed once), then one request in it. */
async function claudeExchange(endpoint: string, access: string, message: Json): Promise<{ answer: Json; sessions: string[] }> {
  const headers = { 'content-type': 'application/json', accept: '*/*', origin: 'https://claude.ai', ...bearer(access) };
  const sessions: string[] = [];
  for (let i = 0; i < 2; i++) {
    const init = await request(endpoint, { method: 'POST', headers, body: JSON.stringify(initMsg(0, '2025-11-25')) });
    assert.equal(init.status, 200, init.text);
    assert.match(String(init.headers['content-type']), /^application\/json/);
    sessions.push(String(init.headers['mcp-session-id']));
  }
  // notifications/initialized has arrived without a session id (claude-ai-mcp#99).
  const note = await request(endpoint, { method: 'POST', headers, body: JSON.stringify({ jsonrpc: '2.0', method: 'notifications/initialized' }) });
  assert.equal(note.status, 202);
  const res = await request(endpoint, { method: 'POST', headers: { ...headers, 'mcp-session-id': sessions[1] }, body: JSON.stringify(message) });
  assert.equal(res.status, 200, res.text);
  return { answer: JSON.parse(res.text), sessions };
}

/** Fixture servers for the tests that need no real server. */
const TWO_FIXTURES = (): Config => ({ servers: [fixture('alpha'), fixture('beta')] });
const REAL_TWO = (): Config => ({ servers: [everything(), srv('memory', [MEMORY])] });

/**
 * Whether the proxy knows a client, told by behaviour (registrations are not written to the state file): its
 * consent page opens (200), or says it is not registered (400). `redirectUri` must be one the client registered.
 */
async function oauthIsRegistered(base: string, clientId: string, redirectUri = OAUTH_CALLBACK): Promise<boolean> {
  const res = await request(oauthAuthorizeUrl(base, clientId, oauthPkce().challenge, { redirectUri }));
  if (res.status === 200) return true;
  assert.equal(res.status, 400, res.text);
  assert.match(res.text, /This client is not registered with this proxy \(it may have expired\)\. Start the connection again from the client\./);
  return false;
}

/**
 * Whether the proxy knows a client, asked at /token (which opens no approval form): a refresh with a token that
 * does not exist is invalid_grant (400) for a known client, invalid_client (401) for one it does not know.
 */
async function oauthKnownAtToken(base: string, client: Json): Promise<boolean> {
  const res = await oauthRefresh(base, client, 'not-a-refresh-token');
  if (res.status === 400) {
    assertOAuthError(res, 400, 'invalid_grant');
    return true;
  }
  assertOAuthError(res, 401, 'invalid_client');
  return false;
}

/** How many registrations a proxy accepted: its "registered client" log lines (info level). */
function oauthRegisteredCount(op: { lines: string[] }): number {
  return op.lines.filter((l) => l.startsWith('info [oauth] registered client ')).length;
}

/** An https redirect URI of exactly `length` characters, padded with `fill` (then one letter, so nothing trails). */
function oauthLongUri(length: number, tag = 'cb', fill = 'x'): string {
  const head = `https://example.com/${tag}/`;
  const uri = head + fill.repeat(length - head.length - 1) + 'z';
  assert.equal(uri.length, length);
  return uri;
}

/** Debian's chromium (apt-get install chromium; .ci/run installs it): the consent page is tried in a real browser. */
const CHROMIUM = '/usr/bin/chromium';
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'];

// ── 10. OAuth: metadata, registration, consent, tokens ─────────────────────────────────────────────────

describe('10. OAuth: metadata, registration, consent, tokens', () => {
  // Metadata and the 401 challenge ───────

  it('protected resource metadata: one document per endpoint (/mcp and /sse of each server), resource exactly that URL, the issuer at the origin root; none at the root with two servers', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    for (const server of ['alpha', 'beta']) {
      for (const leaf of ['mcp', 'sse']) {
        const res = withJson(await request(`${op.base}/.well-known/oauth-protected-resource/${server}/${leaf}`));
        assert.equal(res.status, 200, res.text);
        assert.equal(res.headers['cache-control'], 'no-store');
        assert.deepEqual(res.json, {
          resource: `${op.base}/${server}/${leaf}`,
          authorization_servers: [op.base],
          bearer_methods_supported: ['header'],
          resource_name: server,
        });
      }
    }
    // At the root with two servers there is no one resource to name (e28b5de): 404, as for anything that is not
    // an endpoint.
    for (const p of ['', '/nope/mcp', '/alpha/other', '/alpha/mcp/x', '/mcp']) {
      assertRpcError(await request(`${op.base}/.well-known/oauth-protected-resource${p}`), 404, -32000);
    }
  });

  it('authorization server metadata: exactly what is implemented, at the RFC 8414 and the OpenID discovery paths', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const expected = {
      issuer: op.base,
      authorization_endpoint: `${op.base}/authorize`,
      token_endpoint: `${op.base}/token`,
      registration_endpoint: `${op.base}/register`,
      revocation_endpoint: `${op.base}/revoke`,
      response_types_supported: ['code'],
      response_modes_supported: ['query'],
      grant_types_supported: ['authorization_code', 'refresh_token'],
      code_challenge_methods_supported: ['S256'],
      token_endpoint_auth_methods_supported: ['client_secret_post', 'client_secret_basic', 'none'],
      revocation_endpoint_auth_methods_supported: ['client_secret_post', 'client_secret_basic', 'none'],
      authorization_response_iss_parameter_supported: true,
    };
    for (const p of ['/.well-known/oauth-authorization-server', '/.well-known/openid-configuration']) {
      const res = withJson(await request(`${op.base}${p}`, { headers: { 'mcp-protocol-version': '2025-11-25' } }));
      assert.equal(res.status, 200, p);
      assert.deepEqual(res.json, expected, p);
      assert.equal(res.headers['cache-control'], 'no-store');
    }
  });

  it('401 challenge: absolute resource_metadata naming a document that exists, no error without a token, error="invalid_token" for a bad one', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    for (const leaf of ['mcp', 'sse']) {
      const endpoint = `${op.base}/alpha/${leaf}`;
      const noToken = leaf === 'mcp' ? await post(endpoint, initMsg(0)) : await request(endpoint, { headers: { accept: 'text/event-stream' } });
      assertRpcError(noToken, 401, -32000);
      assert.equal(noToken.headers['www-authenticate'], `Bearer resource_metadata="${op.base}/.well-known/oauth-protected-resource/alpha/${leaf}"`);
      const prm = withJson(await request(bearerParams(noToken.headers['www-authenticate'] as string).resource_metadata));
      assert.equal(prm.status, 200);
      assert.equal(prm.json.resource, endpoint);
      for (const authorization of ['Bearer not-a-token-we-issued', 'Basic dXNlcjpwYXNz', 'Bearer']) {
        const bad = leaf === 'mcp'
          ? await post(endpoint, initMsg(0), { authorization })
          : await request(endpoint, { headers: { accept: 'text/event-stream', authorization } });
        assertRpcError(bad, 401, -32000);
        assert.equal(bad.headers['www-authenticate'], `Bearer resource_metadata="${op.base}/.well-known/oauth-protected-resource/alpha/${leaf}", error="invalid_token"`, authorization);
      }
    }
  });

  it('401 on the legacy POST endpoint (/{name}/messages) names protected resource metadata that exists', { timeout: 20_000 }, async (t) => {
    // An SSE client whose token expired learns where to log in again from this 401 (the SDK's SSEClientTransport
    // runs auth() with it); on a host route a missing document sends the SDK to the wrong issuer (see below).
    const op = await oauthProxy(t, TWO_FIXTURES());
    const res = await post(`${op.base}/alpha/messages?sessionId=whatever`, ping(1));
    assertRpcError(res, 401, -32000);
    const { resource_metadata: at } = bearerParams(res.headers['www-authenticate'] as string);
    const prm = withJson(await request(at));
    assert.equal(prm.status, 200, `resource_metadata ${at} answered ${prm.status}`);
    assert.equal(prm.json.resource, `${op.base}/alpha/sse`);
  });

  it('single-server root route: /mcp and /sse at the root, their metadata, and the root document naming /mcp', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, { servers: [fixture('alpha')] });
    for (const leaf of ['mcp', 'sse']) {
      const prm = withJson(await request(`${op.base}/.well-known/oauth-protected-resource/${leaf}`));
      assert.equal(prm.status, 200);
      assert.deepEqual(prm.json, { resource: `${op.base}/${leaf}`, authorization_servers: [op.base], bearer_methods_supported: ['header'], resource_name: 'alpha' });
    }
    const root = withJson(await request(`${op.base}/.well-known/oauth-protected-resource`));
    assert.equal(root.json.resource, `${op.base}/mcp`);
    const challenge = await post(`${op.base}/mcp`, initMsg(0));
    assert.equal(challenge.status, 401);
    assert.equal(challenge.headers['www-authenticate'], `Bearer resource_metadata="${op.base}/.well-known/oauth-protected-resource/mcp"`);
    // The path route still works beside it, with its own resource.
    const named = await post(`${op.base}/alpha/mcp`, initMsg(0));
    assert.equal(named.headers['www-authenticate'], `Bearer resource_metadata="${op.base}/.well-known/oauth-protected-resource/alpha/mcp"`);
  });

  it('host routes ({name}.{baseDomain}): the challenge, metadata and resource are on the server\'s own origin; the issuer stays the public URL', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES(), { baseDomain: 'mcp.test' });
    for (const server of ['alpha', 'beta']) {
      const host = `${server}.mcp.test:${op.port}`;
      const origin = `http://${host}`;
      const challenge = await post(`${op.base}/mcp`, initMsg(0), { host });
      assertRpcError(challenge, 401, -32000);
      assert.equal(challenge.headers['www-authenticate'], `Bearer resource_metadata="${origin}/.well-known/oauth-protected-resource/mcp"`);
      for (const leaf of ['mcp', 'sse']) {
        const prm = withJson(await request(`${op.base}/.well-known/oauth-protected-resource/${leaf}`, { headers: { host } }));
        assert.equal(prm.status, 200);
        assert.deepEqual(prm.json, { resource: `${origin}/${leaf}`, authorization_servers: [op.base], bearer_methods_supported: ['header'], resource_name: server });
      }
      const root = withJson(await request(`${op.base}/.well-known/oauth-protected-resource`, { headers: { host } }));
      assert.equal(root.json.resource, `${origin}/mcp`);
    }
    // An unknown subdomain is no server, and two servers mean no root route on the public host.
    assert.equal((await request(`${op.base}/.well-known/oauth-protected-resource/mcp`, { headers: { host: `nope.mcp.test:${op.port}` } })).status, 404);
    assert.equal((await request(`${op.base}/.well-known/oauth-protected-resource/mcp`)).status, 404);
  });

  // The whole flow with the SDK's client-side OAuth ───────

  for (const route of ['path', 'host', 'root'] as const) {
    for (const kind of ['mcp', 'sse'] as const) {
      const transportName = kind === 'mcp' ? 'StreamableHTTPClientTransport' : 'SSEClientTransport';
      it(`SDK auth() through ${transportName} on the ${route} route: 401 → discovery → registration → consent → token → tool calls → refresh after expiry → restart without new consent`, { timeout: 60_000 }, async (t) => {
        const config: Config = route === 'root' ? { servers: [everything()] } : REAL_TWO();
        const limits = { accessTokenTtlMs: 1_500 };
        let op = await oauthProxy(t, config, { limits, baseDomain: route === 'host' ? 'mcp.test' : undefined });
        await op.h.proxy.ready();
        const callback = await sdkCallback(t);
        const provider = new SdkProvider(callback.url);
        const seen: string[] = [];
        const fetchFn = route === 'host' ? hostRouteFetch(seen) : undefined;
        const url = sdkEndpoint(op, route, kind);

        const client = await sdkLogin(op, url, kind, provider, callback, fetchFn);
        assert.equal(provider.authUrl!.searchParams.get('resource'), url.href, 'the SDK took resource from the endpoint\'s metadata');
        assert.equal(provider.authUrl!.searchParams.get('code_challenge_method'), 'S256');
        assert.equal(provider.clientIds.size, 1, 'registered once');
        assert.equal(textOf(await client.callTool({ name: 'echo', arguments: { message: 'one' } })), 'Echo: one');
        if (route === 'host') assert.ok(seen.some((s) => s.startsWith(`POST everything.mcp.test:${op.port}/${kind === 'mcp' ? 'mcp' : 'messages'}`)), `requests went to the host route: ${seen.join(', ')}`);

        // Refresh after expiry, on the same connection.
        const before = provider.saved!;
        await waitFor(async () => (await oauthProbe(op.base, before.access_token, 'everything')) === 401, 10_000, 'the access token to expire');
        assert.equal(textOf(await sdkStep('the tool call after the access token expired (refresh)', client.callTool({ name: 'echo', arguments: { message: 'two' } }))), 'Echo: two');
        assert.notEqual(provider.saved!.access_token, before.access_token, 'a new access token');
        assert.notEqual(provider.saved!.refresh_token, before.refresh_token, 'the refresh token rotated');
        assert.equal(provider.redirects, 1, 'no new consent for the refresh');
        await client.close();

        // A restart with the same state directory: the grant is still there, no new consent, no new registration.
        op = await oauthRestart(t, op, config);
        await op.h.proxy.ready();
        const again = new Client({ name: 'oauth-test', version: '1.0.0' });
        op.clients.push(again);
        await sdkStep('connect after the restart', again.connect(sdkTransport(kind, url, provider, fetchFn)));
        assert.equal(textOf(await again.callTool({ name: 'echo', arguments: { message: 'three' } })), 'Echo: three');
        const afterRestart = provider.saved!;
        await waitFor(async () => (await oauthProbe(op.base, afterRestart.access_token, 'everything')) === 401, 10_000, 'the access token to expire after the restart');
        assert.equal(textOf(await sdkStep('the tool call after the restart and expiry (refresh)', again.callTool({ name: 'echo', arguments: { message: 'four' } }))), 'Echo: four');
        assert.equal(provider.redirects, 1, 'still only the first consent');
        assert.equal(provider.clientIds.size, 1, 'still only the first registration');
        assert.equal(oauthState(op).grants.length, 1);
      });
    }
  }

  it('a client that behaves as Claude.ai (Accept */*, no protocol header, DCR with client_secret_post per connection, initialize re-POSTed, a new session per exchange, form-encoded /token) connects and calls a tool', { timeout: 60_000 }, async (t) => {
    const op = await oauthProxy(t, REAL_TWO());
    await op.h.proxy.ready();
    const endpoint = `${op.base}/everything/mcp`;
    const first = await claudeConnect(op.base, endpoint);
    // The consent page says where the browser goes back to: Claude.
    assert.match(first.consent.text, /Sends you back to <b>claude\.ai<\/b>: Claude\./);
    assert.match(first.consent.text, /the server <b>everything<\/b>/);
    assert.match(first.consent.text, /Allow Claude\?/);
    const list = await claudeExchange(endpoint, first.access, { jsonrpc: '2.0', id: 1, method: 'tools/list' });
    assert.ok(list.answer.result.tools.some((tool: Json) => tool.name === 'echo'));
    assert.notEqual(list.sessions[0], list.sessions[1], 're-POSTed initialize opens a new session');
    const called = await claudeExchange(endpoint, first.access, { jsonrpc: '2.0', id: 2, method: 'tools/call', params: { name: 'echo', arguments: { message: 'from claude' } } });
    assert.equal(textOf(called.answer.result), 'Echo: from claude');
    assert.ok(!list.sessions.includes(called.sessions[0]), 'a new session per exchange');

    // A new connection registers a new client; both grants work side by side.
    const second = await claudeConnect(op.base, endpoint);
    assert.notEqual(second.clientId, first.clientId);
    for (const access of [first.access, second.access]) {
      const again = await claudeExchange(endpoint, access, { jsonrpc: '2.0', id: 3, method: 'tools/call', params: { name: 'echo', arguments: { message: 'again' } } });
      assert.equal(textOf(again.answer.result), 'Echo: again');
    }
    assert.equal(oauthState(op).grants.length, 2);
    // Claude.ai refreshes form-encoded with client_secret_post and the resource.
    const refreshed = withJson(await postForm(`${op.base}/token`, { grant_type: 'refresh_token', refresh_token: first.refresh, resource: endpoint, client_id: first.clientId, client_secret: first.clientSecret }));
    assert.equal(refreshed.status, 200, refreshed.text);
    const after = await claudeExchange(endpoint, refreshed.json.access_token, { jsonrpc: '2.0', id: 4, method: 'tools/list' });
    assert.ok(Array.isArray(after.answer.result.tools));
  });

  // Registration (RFC 7591) ───────

  it('registration: 201 with the client\'s metadata; an omitted auth method means client_secret_basic; "none" gets no secret', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const reg = await oauthRegister(op.base);
    assert.equal(reg.status, 201, reg.text);
    assert.equal(reg.headers['cache-control'], 'no-store');
    assert.deepEqual(Object.keys(reg.json).sort(), ['client_id', 'client_id_issued_at', 'client_name', 'client_secret', 'client_secret_expires_at', 'grant_types', 'redirect_uris', 'response_types', 'token_endpoint_auth_method']);
    assert.equal(reg.json.token_endpoint_auth_method, 'client_secret_post');
    assert.equal(reg.json.client_secret_expires_at, 0);
    assert.deepEqual(reg.json.redirect_uris, [OAUTH_CALLBACK]);
    assert.ok(reg.json.client_secret.length >= 32);
    const basic = await oauthRegister(op.base, { token_endpoint_auth_method: undefined });
    assert.equal(basic.json.token_endpoint_auth_method, 'client_secret_basic');
    assert.equal(typeof basic.json.client_secret, 'string');
    const pub = await oauthRegister(op.base, { token_endpoint_auth_method: 'none' });
    assert.equal(pub.status, 201);
    assert.equal(pub.json.client_secret, undefined);
    // Malformed metadata.
    assertOAuthError(await oauthRegister(op.base, '{not json'), 400, 'invalid_client_metadata');
    assertOAuthError(await oauthRegister(op.base, '[]'), 400, 'invalid_client_metadata');
    assertOAuthError(await oauthRegister(op.base, { token_endpoint_auth_method: 'private_key_jwt' }), 400, 'invalid_client_metadata');
    assertOAuthError(await oauthRegister(op.base, { grant_types: ['implicit'] }), 400, 'invalid_client_metadata');
    assertOAuthError(await oauthRegister(op.base, { response_types: ['token'] }), 400, 'invalid_client_metadata');
    const get = withJson(await request(`${op.base}/register`));
    assertOAuthError(get, 405, 'invalid_request');
    assert.equal(get.headers.allow, 'POST');
    // Registrations are not written to the state file (only clients holding a grant are): registered means
    // usable, so each valid client's consent page opens, and only the three valid ones were registered.
    for (const c of [reg.json, basic.json, pub.json]) assert.equal(await oauthIsRegistered(op.base, c.client_id), true, c.token_endpoint_auth_method);
    assert.equal(oauthRegisteredCount(op), 3, 'only the valid registrations are kept');
    assert.deepEqual(oauthState(op).clients, [], 'a registration alone is not written to the state file');
  });

  it('registration: invalid redirect_uris are refused with invalid_redirect_uri (http off loopback, a fragment, credentials, not a URL, none, more than 5, one over 512 characters); 5 URIs of 512 characters are accepted', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const bad: Json[] = [
      ['http://example.com/callback'],
      ['http://192.168.1.10/callback'],
      ['https://claude.ai/api/mcp/auth_callback#frag'],
      ['http://127.0.0.1:9/callback#x'],
      ['https://user:pw@example.com/cb'],
      ['javascript:alert(1)'],
      ['not a url'],
      [42],
      [],
      'https://example.com/cb',
      Array.from({ length: 6 }, (_, i) => `https://example.com/cb${i}`),
      [oauthLongUri(513)],
      [CLAUDE_CALLBACK, oauthLongUri(513)],
    ];
    for (const uris of bad) {
      const res = await oauthRegister(op.base, { redirect_uris: uris });
      assertOAuthError(res, 400, 'invalid_redirect_uri');
      assert.equal(res.json.client_id, undefined);
    }
    assert.equal(oauthRegisteredCount(op), 0, 'nothing registered');
    // Accepted: https anywhere; http on loopback names with any port (RFC 8252 §7.3); five URIs of 512 characters.
    const accepted = [[CLAUDE_CALLBACK], ['http://localhost/callback', 'http://127.0.0.1:33418/callback', 'http://[::1]:8080/cb'], Array.from({ length: 5 }, (_, i) => oauthLongUri(512, `cb${i}`))];
    for (const uris of accepted) {
      const res = await oauthRegister(op.base, { redirect_uris: uris });
      assert.equal(res.status, 201, `${JSON.stringify(uris)}: ${res.text}`);
      assert.deepEqual(res.json.redirect_uris, uris);
      assert.equal(await oauthIsRegistered(op.base, res.json.client_id, uris[0]), true);
    }
    assert.equal(oauthRegisteredCount(op), 3);
  });

  // Since f8c09fd: a control character passed the URL parser mid-path and took six bytes ("\u0001") in the
  // state file, past the per-client bound; anything but visible ASCII must come percent-encoded (RFC 3986).
  it('registration: a redirect URI with anything but visible ASCII (U+0001, a space, a tab, DEL, U+2028, non-ASCII in the path or the host, a space before or after) is refused with invalid_redirect_uri, alone or next to a good one, and nothing is registered; the percent-encoded forms and ! and ~ are accepted as written', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { registrationsPerMinute: 100 } });
    const bad = [
      'https://example.com/cb\u0001x', 'http://127.0.0.1:9/callback\u0001', 'https://example.com/c b', 'https://example.com/c\tb',
      'https://example.com/cb\x7f', 'https://example.com/cb?x=\u2028', 'https://example.com/caf\u00e9', 'https://ex\u00e4mple.com/cb',
      'https://example.com/cb/\u{1f600}', ' https://example.com/cb', 'https://example.com/cb ',
    ];
    for (const uri of bad) {
      for (const uris of [[uri], [CLAUDE_CALLBACK, uri]]) {
        const res = await oauthRegister(op.base, { redirect_uris: uris });
        assertOAuthError(res, 400, 'invalid_redirect_uri');
        assert.equal(res.json.error_description, 'redirect_uris: each must be https, or http on a loopback address, in visible ASCII (percent-encoded), with no fragment', JSON.stringify(uris));
        assert.equal(res.json.client_id, undefined);
      }
    }
    assert.equal(oauthRegisteredCount(op), 0, 'nothing registered');
    const good = ['https://example.com/cb%01x', 'http://127.0.0.1:9/callback%01', 'https://example.com/c%20b', 'https://example.com/caf%C3%A9', 'https://xn--exmple-cua.com/cb', 'https://example.com/!~'];
    for (const uri of good) {
      const res = await oauthRegister(op.base, { redirect_uris: [uri] });
      assert.equal(res.status, 201, `${uri}: ${res.text}`);
      assert.deepEqual(res.json.redirect_uris, [uri]);
      assert.equal(await oauthIsRegistered(op.base, res.json.client_id, uri), true, uri);
    }
    assert.equal(oauthRegisteredCount(op), good.length);
  });

  it('registrationsPerMinute: under and at the limit register, one over → 429 slow_down with Retry-After, and nothing is registered', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { registrationsPerMinute: 3 } });
    for (let i = 0; i < 3; i++) assert.equal((await oauthRegister(op.base)).status, 201, `registration ${i + 1}`);
    const over = await oauthRegister(op.base);
    assertOAuthError(over, 429, 'slow_down');
    assert.equal(over.headers['retry-after'], '60');
    assert.equal(over.json.client_id, undefined);
    assert.equal(oauthRegisteredCount(op), 3);
  });

  it('maxOAuthBodyBytes: a registration body of limit - 1 and limit bytes is read, limit + 1 → OAuth 413 invalid_request (Content-Length) and nothing registered; the same bound on /token, /authorize and /revoke', { timeout: 20_000 }, async (t) => {
    const limit = 2048;
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { maxOAuthBodyBytes: limit } });
    const sized = (bytes: number) => {
      const base = JSON.stringify({ ...OAUTH_CLIENT_DEFAULTS, client_name: '' });
      const text = JSON.stringify({ ...OAUTH_CLIENT_DEFAULTS, client_name: 'n'.repeat(bytes - Buffer.byteLength(base)) });
      assert.equal(Buffer.byteLength(text), bytes);
      return text;
    };
    assert.equal((await oauthRegister(op.base, sized(limit - 1))).status, 201);
    assert.equal((await oauthRegister(op.base, sized(limit))).status, 201);
    // Content-Length says the body is over the limit: an OAuth error, before any of it is read.
    const declared = async (endpoint: string, contentType: string, body: string) => {
      const res = withJson(await request(`${op.base}${endpoint}`, { method: 'POST', headers: { 'content-type': contentType, 'content-length': String(Buffer.byteLength(body)) }, body }));
      assertOAuthError(res, 413, 'invalid_request');
      assert.deepEqual(res.json, { error: 'invalid_request', error_description: 'Request body too large' }, endpoint);
      assert.equal(res.headers.connection, 'close', endpoint);
    };
    await declared('/register', 'application/json', sized(limit + 1));
    assert.equal(oauthRegisteredCount(op), 2, 'the body over the limit registered nothing');
    const big = 'x'.repeat(limit + 1);
    for (const endpoint of ['/token', '/authorize', '/revoke']) await declared(endpoint, FORM['content-type'], big);
    // Without a Content-Length (request() sends chunked) the body is cut off as it arrives, by readBody(): its
    // JSON-RPC 413.
    const chunked = await oauthRegister(op.base, sized(limit + 1));
    assert.equal(chunked.status, 413, chunked.text);
    assert.deepEqual(chunked.json, { jsonrpc: '2.0', id: null, error: { code: -32600, message: 'Request body too large' } });
    assert.equal(oauthRegisteredCount(op), 2);
  });

  // Hostile review (fixed in e28b5de): client metadata document fetches were unbounded and failures refetched.
  it('CIMD: at most 4 metadata fetches at once (the 5th gets "Too many client metadata documents"), a failed fetch is not repeated within 60 s, and fetchClientMetadata refuses fec0::/10, 2002::/16 and 2001::/32 literals, private and loopback IPv4 literals, other schemes and ports, and a name resolving to loopback (ProxyError CIMD)', { timeout: 15_000 }, async (t) => {
    let calls = 0;
    let inflight = 0;
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    t.after(() => release());
    const op = await oauthProxy(t, TWO_FIXTURES(), {
      extra: {
        clientMetadataHosts: ['claude.ai'],
        fetchClientMetadata: async (url: URL) => {
          calls++;
          inflight++;
          try {
            if (url.pathname.startsWith('/slow/')) await gate;
            throw new Error('404');
          } finally {
            inflight--;
          }
        },
      },
    });
    const page = (id: string) => request(oauthAuthorizeUrl(op.base, `https://claude.ai/${id}`, oauthPkce().challenge, { redirectUri: CLAUDE_CALLBACK }));
    const FAILED = "The client's metadata document could not be fetched: network error.";
    const slow = [1, 2, 3, 4].map((i) => page(`slow/${i}`));
    await waitFor(() => inflight === 4, 3_000, '4 fetches in flight');
    try {
      // The 5th answers at once with a page; before e28b5de it joined the others in the fetcher (and waited).
      let answered = false;
      const fifth = page('slow/5').finally(() => (answered = true));
      await waitFor(() => answered || inflight > 4, 3_000, 'the 5th authorize to be answered or fetched');
      assert.equal(inflight, 4, 'no 5th fetch at once');
      const first = await fifth;
      assertConsentErrorPage(first, 400, 'Too many client metadata documents are being fetched; try again shortly.');
    } finally {
      release();
    }
    for (const res of await Promise.all(slow)) assertConsentErrorPage(res, 400, FAILED);
    assert.equal(calls, 4);
    // A failure is remembered: the same client_id again is answered without a fetch.
    assertConsentErrorPage(await page('fails'), 400, FAILED);
    assertConsentErrorPage(await page('fails'), 400, FAILED);
    assert.equal(calls, 5);
    assert.equal(op.lines.filter((l) => l.startsWith('warn [oauth] client metadata document https://claude.ai/fails: ')).length, 1, op.lines.join('\n'));
    // The real fetcher refuses these literals before connecting.
    for (const host of ['[fec0::1]', '[2002:7f00:1::1]', '[2001::1]', '[2001:0:4136:e378:8000:63bf:3fff:fdd2]']) {
      const refused = await within(fetchClientMetadata(new URL(`https://${host}/client.json`)).then(() => null, (err: unknown) => err), 2_000, host);
      assert.ok(refused instanceof Error, `${host} refused`);
      assert.equal((refused as Error & { code?: string }).code, 'CIMD');
      assert.equal(refused.message, `${host} is a private or loopback address`);
    }
    // IPv4 literals of every special-purpose range that matters for SSRF, and an IPv4-mapped loopback.
    for (const host of ['127.0.0.1', '10.1.2.3', '172.16.0.1', '192.168.1.1', '169.254.169.254', '100.64.0.1', '0.0.0.0', '[::ffff:127.0.0.1]']) {
      const refused = await within(fetchClientMetadata(new URL(`https://${host}/client.json`)).then(() => null, (err: unknown) => err), 2_000, host);
      assert.equal((refused as Error & { code?: string } | null)?.code, 'CIMD', `${host} refused`);
    }
    // Only https on 443; a name that resolves to loopback is refused at the lookup (no connection is made).
    for (const url of ['http://claude.ai/client.json', 'https://claude.ai:8443/client.json']) {
      const refused = await fetchClientMetadata(new URL(url)).then(() => null, (err: unknown) => err as Error);
      assert.equal(refused?.message, 'not https on port 443', url);
    }
    const local = await within(fetchClientMetadata(new URL('https://localhost/client.json')).then(() => null, (err: unknown) => err), 5_000, 'localhost');
    assert.equal((local as Error & { code?: string } | null)?.code, 'CIMD', 'a name resolving to loopback is refused');
  });

  // Consent (/authorize) ───────

  it('consent page: CSP with default-src \'none\' and frame-ancestors \'none\', X-Frame-Options DENY, no scripts, no caching; it names the client (escaped), the redirect host and the server', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const client = await oauthClient(op.base, { client_name: '<script>alert(1)</script> & "friends"', redirect_uris: ['https://evil.example/cb'] });
    const { challenge } = oauthPkce();
    const page = await request(oauthAuthorizeUrl(op.base, client.client_id, challenge, { redirectUri: 'https://evil.example/cb', server: 'beta' }));
    assert.equal(page.status, 200);
    const checkHeaders = (res: RawResponse, what: string) => {
      const csp = String(res.headers['content-security-policy']);
      assert.match(csp, /(^|; )default-src 'none'(;|$)/, what);
      assert.match(csp, /(^|; )frame-ancestors 'none'(;|$)/, what);
      assert.match(csp, /(^|; )base-uri 'none'(;|$)/, what);
      assert.doesNotMatch(csp, /script-src/, what);
      assert.equal(res.headers['x-frame-options'], 'DENY', what);
      assert.equal(res.headers['x-content-type-options'], 'nosniff', what);
      assert.equal(res.headers['cache-control'], 'no-store', what);
      // same-origin, not no-referrer: with no-referrer browsers send `Origin: null` on the form's POST.
      assert.equal(res.headers['referrer-policy'], 'same-origin', what);
      assert.match(String(res.headers['content-type']), /^text\/html/, what);
      assert.doesNotMatch(res.text, /<script/i, what);
      assert.doesNotMatch(res.text, /\son[a-z]+=/i, `${what}: no event handler attributes`);
    };
    checkHeaders(page, 'consent page');
    assert.match(page.text, /&#60;script&#62;alert\(1\)&#60;\/script&#62; &#38; &#34;friends&#34;/);
    assert.match(page.text, /Sends you back to <b>evil\.example<\/b>\. This is not Claude/);
    assert.match(page.text, /the server <b>beta<\/b>/);
    assert.match(page.text, /<form method="post" action="\/authorize">/);
    // form-action allows the redirect's origin (browsers apply it to the redirect after the POST).
    assert.match(String(page.headers['content-security-policy']), /form-action 'self' https:\/\/evil\.example/);
    // The error page and the wrong-passphrase page carry the same headers.
    checkHeaders(await request(`${op.base}/authorize?client_id=nope`), 'error page');
    const wrong = await consentSubmit(op.base, consentCsrf(page)!, 'wrong passphrase!!');
    assert.equal(wrong.status, 401);
    checkHeaders(wrong, 'wrong-passphrase page');
    // The 303 that carries the code sends no Referer to the client and is not cached.
    const approved = await consentSubmit(op.base, consentCsrf(wrong)!);
    assert.equal(approved.status, 303);
    assert.equal(approved.headers['referrer-policy'], 'no-referrer');
    assert.equal(approved.headers['cache-control'], 'no-store');
    // Without a resource the page says the grant covers every server; a loopback redirect is named as such.
    const local = await oauthClient(op.base);
    const all = await request(oauthAuthorizeUrl(op.base, local.client_id, challenge, { resource: null }));
    assert.match(all.text, /<b>every server<\/b> of this proxy/);
    assert.match(all.text, /a program on the computer where your browser runs/);
  });

  // Hostile review (fixed in e28b5de): any redirect URI on claude.ai was marked as Claude.
  it('consent page: "Sends you back to claude.ai: Claude." only for exactly https://claude.ai or https://claude.com /api/mcp/auth_callback; https://claude.ai:8443/x and https://claude.ai/share/x get the warning; every form says "Approve only if you started this connection yourself"', { timeout: 15_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const show = async (redirect: string) => {
      const c = await oauthClient(op.base, { client_name: 'Claude', redirect_uris: [redirect] });
      const res = await request(oauthAuthorizeUrl(op.base, c.client_id, oauthPkce().challenge, { redirectUri: redirect }));
      assert.equal(res.status, 200, res.text);
      return res.text;
    };
    const APPROVE_ONLY = '<p>Approve only if you started this connection yourself, just now.</p>';
    for (const [redirect, host] of [['https://claude.ai:8443/x', 'claude.ai:8443'], ['https://claude.ai/share/x', 'claude.ai'], ['https://claude.com/api/mcp/auth_callback/x', 'claude.com']]) {
      const text = await show(redirect);
      assert.ok(!text.includes(': Claude.'), `${redirect} is not marked as Claude`);
      assert.ok(text.includes(`<div class="box warn">Sends you back to <b>${host}</b>. This is not Claude: approve only if you know this site.</div>`), text);
      assert.ok(text.includes(APPROVE_ONLY), text);
    }
    for (const [redirect, host] of [['https://claude.ai/api/mcp/auth_callback', 'claude.ai'], ['https://claude.com/api/mcp/auth_callback', 'claude.com']]) {
      const text = await show(redirect);
      assert.ok(text.includes(`<div class="box ok">Sends you back to <b>${host}</b>: Claude.</div>`), text);
      assert.ok(text.includes(APPROVE_ONLY), text);
    }
  });

  it('consent errors before the redirect URI is known good are shown on the page, never redirected: unknown client, unregistered redirect URI, none given with several registered', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const client = await oauthClient(op.base, { redirect_uris: [OAUTH_CALLBACK, 'https://app.example/cb'] });
    const { challenge } = oauthPkce();
    const cases: [string, RegExp][] = [
      [oauthAuthorizeUrl(op.base, 'no-such-client', challenge), /not registered/],
      [oauthAuthorizeUrl(op.base, client.client_id, challenge, { redirectUri: 'https://attacker.example/cb' }), /not one this client registered/],
      [oauthAuthorizeUrl(op.base, client.client_id, challenge, { redirectUri: 'https://app.example/cb/extra' }), /not one this client registered/],
      [oauthAuthorizeUrl(op.base, client.client_id, challenge, { redirectUri: 'http://127.0.0.1:9/other' }), /not one this client registered/],
      [oauthAuthorizeUrl(op.base, client.client_id, challenge, { redirectUri: 'http://localhost:9/callback' }), /not one this client registered/],
      [oauthAuthorizeUrl(op.base, client.client_id, challenge, { redirectUri: null }), /not one this client registered/],
      // Even with every other parameter wrong too: the redirect URI is checked first.
      [oauthAuthorizeUrl(op.base, client.client_id, challenge, { redirectUri: 'https://attacker.example/cb', state: null, method: 'plain', responseType: 'token' }), /not one this client registered/],
    ];
    for (const [url, text] of cases) {
      const res = await request(url);
      assert.equal(res.status, 400, url);
      assert.equal(res.headers.location, undefined, `${url}: not redirected`);
      assert.match(res.text, text, url);
      assert.equal(consentCsrf(res), null, 'no form to approve');
    }
    // A loopback redirect may use another port (RFC 8252 §7.3), and the code goes back to that port.
    const c = await oauthCode(op.base, client, { redirectUri: 'http://127.0.0.1:45678/callback' });
    assert.equal(c.location.port, '45678');
    assert.equal(oauthState(op).grants.length, 0);
  });

  // Since e28b5de these are shown on the page too: anyone can register a redirect URI, so redirecting errors to
  // it would make the proxy an open redirector.
  it('consent errors after the redirect URI is known good are shown on the page too, never redirected: missing state, no PKCE, plain PKCE, another response_type, a resource that is not ours; the operator\'s denial goes back with access_denied', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const client = await oauthClient(op.base);
    const { challenge } = oauthPkce();
    const PKCE = ['invalid_request', 'PKCE with code_challenge_method S256 is required'];
    const TARGET = ['invalid_target', 'resource is not an endpoint of this proxy'];
    const cases: [AuthorizeOptions, string[]][] = [
      [{ state: null }, ['invalid_request', 'state is required']],
      [{ state: '' }, ['invalid_request', 'state is required']],
      [{ challenge: null }, PKCE],
      [{ method: null }, PKCE],
      [{ method: 'plain' }, PKCE],
      [{ challenge: 'short' }, PKCE],
      [{ responseType: 'token' }, ['unsupported_response_type', 'response_type must be code']],
      [{ resource: 'https://evil.example/alpha/mcp' }, TARGET],
      [{ resource: `${op.base}/nope/mcp` }, TARGET],
      [{ resource: `${op.base}/alpha/messages` }, TARGET],
      [{ resource: `${op.base}/alpha/mcp#frag` }, TARGET],
      [{ resource: `${op.base}/alpha/mcp?x=1` }, TARGET],
      [{ resource: 'not a url' }, TARGET],
    ];
    for (const [o, [error, description]] of cases) {
      const res = await request(oauthAuthorizeUrl(op.base, client.client_id, challenge, o));
      assert.equal(res.status, 400, `${JSON.stringify(o)}: ${res.text}`);
      assert.equal(res.headers.location, undefined, `${JSON.stringify(o)}: not redirected`);
      assert.ok(res.text.includes(`<p class="err">The client&#39;s request is invalid (${error}): ${description}.</p>`), `${JSON.stringify(o)}: ${res.text}`);
      assert.equal(consentCsrf(res), null, 'no form to approve');
    }
    // State comes back unchanged, whatever it holds; the operator's denial is an error too.
    const odd = 'a b&c=d/é+%';
    const approved = await oauthCode(op.base, client, { state: odd });
    assert.equal(approved.location.searchParams.get('state'), odd);
    const page = await request(oauthAuthorizeUrl(op.base, client.client_id, challenge, { state: 's2' }));
    const denied = await postForm(`${op.base}/authorize`, { csrf: consentCsrf(page)!, action: 'deny' }, { origin: op.base });
    assert.equal(denied.status, 303);
    const deniedAt = new URL(String(denied.headers.location));
    assert.equal(`${deniedAt.origin}${deniedAt.pathname}`, OAUTH_CALLBACK);
    assert.equal(deniedAt.searchParams.get('error'), 'access_denied');
    assert.equal(deniedAt.searchParams.get('error_description'), 'The operator denied access');
    assert.equal(deniedAt.searchParams.get('state'), 's2');
    assert.equal(deniedAt.searchParams.get('iss'), op.base);
    assert.equal(deniedAt.searchParams.get('code'), null);
    assert.equal(oauthState(op).grants.length, 0);
  });

  // Hostile review (fixed in e28b5de): errors were redirected to any registered URI (an open redirector).
  it('open redirect: an invalid authorization request (response_type=token, plain PKCE, a resource that is no endpoint, no state) for a client registered with https://evil.example/phish → 400 HTML page naming the error, never a 303 to evil.example', { timeout: 15_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const EVIL = 'https://evil.example/phish';
    const evil = await oauthClient(op.base, { redirect_uris: [EVIL] });
    const cases: [AuthorizeOptions, string][] = [
      [{ responseType: 'token' }, "The client's request is invalid (unsupported_response_type): response_type must be code."],
      [{ method: 'plain' }, "The client's request is invalid (invalid_request): PKCE with code_challenge_method S256 is required."],
      [{ resource: `${op.base}/nothing/mcp` }, "The client's request is invalid (invalid_target): resource is not an endpoint of this proxy."],
      [{ state: null }, "The client's request is invalid (invalid_request): state is required."],
    ];
    for (const [params, message] of cases) {
      const res = await request(oauthAuthorizeUrl(op.base, evil.client_id, oauthPkce().challenge, { redirectUri: EVIL, ...params }));
      assertConsentErrorPage(res, 400, message);
    }
    // The same client's valid request still gets the form (and only that warns about the site).
    await consentOpen(oauthAuthorizeUrl(op.base, evil.client_id, oauthPkce().challenge, { redirectUri: EVIL }));
  });

  // Hostile review (fixed in e28b5de): resource was compared after URL parsing, and the metadata paths answered
  // for what they do not serve.
  it('resource exactness: a resource with backslashes, userinfo, dot segments or a query → 400 page (invalid_target); upper-case scheme and host accepted; root protected resource metadata with two servers → 404; /.well-known/oauth-authorization-server/alpha/mcp → 404', { timeout: 15_000 }, async (t) => {
    const P = await freePort();
    const op = await oauthProxy(t, TWO_FIXTURES(), { port: P, extra: { publicUrl: `http://localhost:${P}` } });
    const c = await oauthClient(op.base);
    for (const resource of [`http://localhost:${P}\\alpha\\mcp`, `http://u@localhost:${P}/alpha/mcp`, `http://localhost:${P}/x/../alpha/mcp`,
      `http://localhost:${P}/alpha/./mcp`, `http://localhost:${P}/alpha/mcp?x=1`, `http://localhost:${P}/alpha/mcp?`]) {
      const res = await request(oauthAuthorizeUrl(op.base, c.client_id, oauthPkce().challenge, { resource }));
      assertConsentErrorPage(res, 400, "The client's request is invalid (invalid_target): resource is not an endpoint of this proxy.");
    }
    for (const resource of [`HTTP://LOCALHOST:${P}/alpha/mcp`, `http://localhost:${P}/alpha/mcp`]) {
      const res = await request(oauthAuthorizeUrl(op.base, c.client_id, oauthPkce().challenge, { resource }));
      assert.equal(res.status, 200, `${resource}: ${res.text.slice(-300)}`);
      assert.ok(res.text.includes('asks to use the server <b>alpha</b> on your behalf'), res.text);
    }
    const root = await request(`${op.base}/.well-known/oauth-protected-resource`);
    assert.equal(root.status, 404, root.text);
    const pathAs = await request(`${op.base}/.well-known/oauth-authorization-server/alpha/mcp`);
    assert.equal(pathAs.status, 404, pathAs.text);
    assert.equal(pathAs.headers['www-authenticate'], undefined);
    // The documents that do exist still answer.
    assert.equal((await request(`${op.base}/.well-known/oauth-protected-resource/alpha/mcp`)).status, 200);
    assert.equal((await request(`${op.base}/.well-known/oauth-authorization-server`)).status, 200);
  });

  it('wrong passphrase: 401 page with a new form, no redirect and no code; the old form is dead; the right passphrase then works', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const client = await oauthClient(op.base);
    const { challenge } = oauthPkce();
    const page = await request(oauthAuthorizeUrl(op.base, client.client_id, challenge));
    const csrf = consentCsrf(page)!;
    const res = await consentSubmit(op.base, csrf, 'wrong passphrase, typed in a hurry');
    assert.equal(res.status, 401, res.text);
    assert.equal(res.headers.location, undefined);
    assert.match(res.text, /Wrong passphrase\./);
    const retry = consentCsrf(res);
    assert.ok(retry && retry !== csrf, 'a new csrf token');
    // The form that was answered is single-use.
    const replay = await consentSubmit(op.base, csrf);
    assert.equal(replay.status, 400);
    assert.equal(replay.headers.location, undefined);
    assert.match(replay.text, /expired or was already used/);
    assert.equal(oauthState(op).grants.length, 0);
    const ok = await consentSubmit(op.base, retry);
    assert.equal(ok.status, 303);
    assert.ok(new URL(String(ok.headers.location)).searchParams.get('code'));
    // Near misses, each on a fresh form.
    for (const wrong of ['', 'correct horse battery stapl', 'correct horse battery staple ', 'CORRECT HORSE BATTERY STAPLE']) {
      const fresh = consentCsrf(await request(oauthAuthorizeUrl(op.base, client.client_id, challenge)))!;
      const res = await consentSubmit(op.base, fresh, wrong);
      assert.equal(res.status, 401, JSON.stringify(wrong));
      assert.equal(res.headers.location, undefined);
    }
    assert.equal(oauthState(op).grants.length, 0);
  });

  it('loginFailuresPerWindow: wrong passphrases under and at the limit get 401; the next attempt, even right, gets 429 with Retry-After and no code; a right one under the limit resets the count', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { loginFailuresPerWindow: 3, loginFailureWindowMs: 60_000 } });
    const client = await oauthClient(op.base);
    const { challenge } = oauthPkce();
    const form = async () => consentCsrf(await request(oauthAuthorizeUrl(op.base, client.client_id, challenge)))!;
    // Under: two wrong, then the right one works and resets the count.
    for (let i = 0; i < 2; i++) assert.equal((await consentSubmit(op.base, await form(), `wrong-${i}-passphrase`)).status, 401);
    assert.equal((await consentSubmit(op.base, await form())).status, 303);
    // At: three wrong in a row are each a 401 ...
    for (let i = 0; i < 3; i++) assert.equal((await consentSubmit(op.base, await form(), `wrong-${i}-passphrase`)).status, 401, `wrong ${i + 1}`);
    // ... over: the fourth attempt is refused before the passphrase is checked.
    const over = await consentSubmit(op.base, await form());
    assert.equal(over.status, 429, over.text);
    assert.equal(over.headers.location, undefined);
    assert.equal(over.headers['retry-after'], '60');
    assert.match(over.text, /Too many wrong passphrases/);
    assert.equal(consentCsrf(over), null);
    assert.equal(over.headers['x-frame-options'], 'DENY');
  });

  // Hostile review (fixed in e28b5de): one budget for everyone let strangers lock the operator out, and behind a
  // reverse proxy every client had the proxy's address.
  it('passphrase budget: per address loginFailuresPerWindow then 429; past loginFailuresTotalPerWindow only addresses that failed are refused and one with no failure approves; trustProxy makes X-Forwarded-For the client (separate budgets, also for registrations), without it all share the proxy\'s address', { timeout: 15_000 }, async (t) => {
    const limits = { loginFailuresPerWindow: 2, loginFailuresTotalPerWindow: 3, consentPagesPerMinute: 1_000, registrationsPerMinute: 2 };
    const TOO_MANY = 'Too many wrong passphrases. Wait a few minutes, then start again from the client.';
    // Direct connections from several loopback addresses: per-address and proxy-wide budgets.
    {
      const op = await oauthProxy(t, TWO_FIXTURES(), { limits });
      const c = await oauthClient(op.base);
      const url = () => oauthAuthorizeUrl(op.base, c.client_id, oauthPkce().challenge);
      const attempt = async (from: string, passphrase: string) => consentSubmit(op.base, await consentOpen(url()), passphrase, {}, {}, from);
      assert.equal((await attempt('127.0.0.2', 'wrong one')).status, 401);
      assert.equal((await attempt('127.0.0.2', 'wrong two')).status, 401);
      const refused = await attempt('127.0.0.2', PASSPHRASE); // its own budget is spent: even the right one is refused
      assertConsentErrorPage(refused, 429, TOO_MANY);
      assert.equal(refused.headers['retry-after'], String(DEFAULT_LIMITS.loginFailureWindowMs / 1000));
      assert.ok(op.lines.includes('warn [oauth] refused a passphrase attempt from 127.0.0.2: too many wrong ones'), op.lines.join('\n'));
      // 127.0.0.3 fails once: 3 wrong ones in all, the proxy-wide budget. It has failed, so it is refused now.
      assert.equal((await attempt('127.0.0.3', 'wrong three')).status, 401);
      assert.ok(op.lines.includes('warn [oauth] wrong passphrase on the consent page from 127.0.0.3'), op.lines.join('\n'));
      assertConsentErrorPage(await attempt('127.0.0.3', PASSPHRASE), 429, TOO_MANY);
      assert.ok(op.lines.includes('warn [oauth] refused a passphrase attempt from 127.0.0.3: too many wrong ones'), op.lines.join('\n'));
      // The operator, from an address with no failure, still gets in.
      consentCode(await attempt('127.0.0.4', PASSPHRASE));
    }
    // Behind a reverse proxy on 127.0.0.1 that is trusted: each X-Forwarded-For client has its own budget.
    {
      const op = await oauthProxy(t, TWO_FIXTURES(), { limits, extra: { trustProxy: ['127.0.0.1'] } });
      const c = await oauthClient(op.base);
      const attempt = async (xff: string, passphrase: string, from?: string) =>
        consentSubmit(op.base, await consentOpen(oauthAuthorizeUrl(op.base, c.client_id, oauthPkce().challenge)), passphrase, {}, { 'x-forwarded-for': xff }, from);
      assert.equal((await attempt('198.51.100.9, 203.0.113.7', 'wrong one')).status, 401); // rightmost untrusted hop
      assert.equal((await attempt('203.0.113.7', 'wrong two')).status, 401);
      assertConsentErrorPage(await attempt('203.0.113.7', PASSPHRASE), 429, TOO_MANY);
      assert.ok(op.lines.includes('warn [oauth] refused a passphrase attempt from 203.0.113.7: too many wrong ones'), op.lines.join('\n'));
      consentCode(await attempt('203.0.113.8', PASSPHRASE)); // another client behind the same proxy
      // A connection from an address that is not a trusted proxy: its X-Forwarded-For is not believed.
      assert.equal((await attempt('198.51.100.1', 'wrong', '127.0.0.2')).status, 401);
      assert.ok(op.lines.includes('warn [oauth] wrong passphrase on the consent page from 127.0.0.2'), op.lines.join('\n'));
      // Registrations (2 per minute) are counted per forwarded address too.
      const xff = (a: string) => ({ 'x-forwarded-for': a });
      assert.equal((await oauthRegister(op.base, {}, xff('203.0.113.20'))).status, 201);
      assert.equal((await oauthRegister(op.base, {}, xff('203.0.113.20'))).status, 201);
      assertOAuthError(await oauthRegister(op.base, {}, xff('203.0.113.20')), 429, 'slow_down');
      assert.equal((await oauthRegister(op.base, {}, xff('203.0.113.21'))).status, 201);
    }
    // The same reverse proxy, not trusted: every client shares 127.0.0.1.
    {
      const op = await oauthProxy(t, TWO_FIXTURES(), { limits });
      const c = await oauthClient(op.base); // registration 1 of 127.0.0.1
      const attempt = async (xff: string, passphrase: string) =>
        consentSubmit(op.base, await consentOpen(oauthAuthorizeUrl(op.base, c.client_id, oauthPkce().challenge)), passphrase, {}, { 'x-forwarded-for': xff });
      assert.equal((await attempt('203.0.113.7', 'wrong one')).status, 401);
      assert.equal((await attempt('203.0.113.7', 'wrong two')).status, 401);
      assertConsentErrorPage(await attempt('203.0.113.8', PASSPHRASE), 429, TOO_MANY);
      assert.ok(op.lines.includes('warn [oauth] refused a passphrase attempt from 127.0.0.1: too many wrong ones'), op.lines.join('\n'));
      assert.equal((await oauthRegister(op.base, {}, { 'x-forwarded-for': '203.0.113.20' })).status, 201);
      assertOAuthError(await oauthRegister(op.base, {}, { 'x-forwarded-for': '203.0.113.21' }), 429, 'slow_down');
    }
  });

  // Since fba7c1f only the entry the trusted proxy wrote (the rightmost one not itself a trusted proxy) is
  // believed, and only if it is a bare address: anything left of it, or a port or "unknown" in it, came from the
  // client, which could otherwise pick whose budget its failures are charged to.
  it('trustProxy: an X-Forwarded-For whose nearest entry is not a bare address ("1.2.3.4, unknown", "1.2.3.4, 5.6.7.8:99") counts against the connecting proxy\'s own budget (127.0.0.1), not 1.2.3.4\'s; 1.2.3.4 itself still approves', { timeout: 15_000 }, async (t) => {
    const limits = { loginFailuresPerWindow: 2, loginFailuresTotalPerWindow: 100, consentPagesPerMinute: 1_000, registrationsPerMinute: 100 };
    const TOO_MANY = 'Too many wrong passphrases. Wait a few minutes, then start again from the client.';
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits, extra: { trustProxy: ['127.0.0.1'] } });
    const c = await oauthClient(op.base);
    const attempt = async (passphrase: string, headers: Record<string, string>) =>
      consentSubmit(op.base, await consentOpen(oauthAuthorizeUrl(op.base, c.client_id, oauthPkce().challenge)), passphrase, {}, headers);
    const WRONG_FROM_PROXY = 'warn [oauth] wrong passphrase on the consent page from 127.0.0.1';
    assert.equal((await attempt('wrong one', { 'x-forwarded-for': '1.2.3.4, unknown' })).status, 401);
    assert.equal((await attempt('wrong two', { 'x-forwarded-for': '1.2.3.4, 5.6.7.8:99' })).status, 401);
    assert.equal(op.lines.filter((l) => l === WRONG_FROM_PROXY).length, 2, op.lines.join('\n'));
    // 127.0.0.1's budget is spent: the same headers, and a request with none, are refused even with the right one.
    for (const headers of [{ 'x-forwarded-for': '1.2.3.4, unknown' }, { 'x-forwarded-for': '1.2.3.4, 5.6.7.8:99' }, {}] as Record<string, string>[]) {
      assertConsentErrorPage(await attempt(PASSPHRASE, headers), 429, TOO_MANY);
    }
    assert.equal(op.lines.filter((l) => l === 'warn [oauth] refused a passphrase attempt from 127.0.0.1: too many wrong ones').length, 3, op.lines.join('\n'));
    // 1.2.3.4 (and 5.6.7.8) were never charged: forwarded as a bare address, 1.2.3.4 approves.
    assert.deepEqual(op.lines.filter((l) => /1\.2\.3\.4|5\.6\.7\.8/.test(l)), []);
    consentCode(await attempt(PASSPHRASE, { 'x-forwarded-for': '1.2.3.4' }));
  });

  // Since e28b5de a full table refuses newcomers instead of dropping the oldest form (a flood dropped the
  // operator's open form).
  it('maxPendingConsents: consent pages up to the limit can all be answered; one over → 503 page with Retry-After, and the forms already open stay valid', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { maxPendingConsents: 2 } });
    const client = await oauthClient(op.base);
    const { challenge } = oauthPkce();
    const page = () => request(oauthAuthorizeUrl(op.base, client.client_id, challenge));
    const open = async () => {
      const res = await page();
      assert.equal(res.status, 200, res.text);
      return consentCsrf(res)!;
    };
    // Under and at.
    const atLimit = [await open(), await open()];
    for (const csrf of atLimit) assert.equal((await consentSubmit(op.base, csrf)).status, 303);
    // Over.
    const [first, second] = [await open(), await open()];
    const over = await page();
    assert.equal(over.status, 503, over.text);
    assert.equal(over.headers['retry-after'], String(DEFAULT_LIMITS.retryAfterS));
    assert.ok(over.text.includes('<p class="err">Too many approvals are waiting. Try again in a few minutes.</p>'), over.text);
    assert.equal(consentCsrf(over), null);
    assert.equal((await consentSubmit(op.base, first)).status, 303, 'the oldest open form still works');
    const third = await open(); // answering one made room
    for (const csrf of [second, third]) assert.equal((await consentSubmit(op.base, csrf)).status, 303);
  });

  // Hostile review (fixed in e28b5de): a flood of consent pages dropped the operator's open form, and a flood of
  // registrations evicted clients mid-login.
  it('consent flood: GET /authorize past consentPagesPerMinute → 429 page for that address only; with maxPendingConsents full newcomers get 503 and the open forms still approve; registering past maxOAuthClients never evicts a client with an open form or an unexchanged code', { timeout: 15_000 }, async (t) => {
    {
      const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { consentPagesPerMinute: 3, maxPendingConsents: 3 } });
      const operator = await oauthClient(op.base);
      const attacker = await oauthClient(op.base, { redirect_uris: ['https://evil.example/'] });
      const mine = await consentOpen(oauthAuthorizeUrl(op.base, operator.client_id, oauthPkce().challenge));
      const theirs = oauthAuthorizeUrl(op.base, attacker.client_id, oauthPkce().challenge, { redirectUri: 'https://evil.example/' });
      await consentOpen(theirs, '127.0.0.5');
      await consentOpen(theirs, '127.0.0.5'); // 3 forms open: the limit
      const full = await request(theirs, { localAddress: '127.0.0.5' });
      assertConsentErrorPage(full, 503, 'Too many approvals are waiting. Try again in a few minutes.');
      assert.equal(full.headers['retry-after'], String(DEFAULT_LIMITS.retryAfterS));
      const limited = await request(theirs, { localAddress: '127.0.0.5' }); // 4th page of 127.0.0.5 this minute
      assertConsentErrorPage(limited, 429, 'Too many authorization requests from your address. Wait a minute.');
      assert.equal(limited.headers['retry-after'], '60');
      assertConsentErrorPage(await request(theirs, { localAddress: '127.0.0.6' }), 503, 'Too many approvals are waiting. Try again in a few minutes.');
      consentCode(await consentSubmit(op.base, mine)); // the operator's form survived the flood
    }
    {
      const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { maxOAuthClients: 3, registrationsPerMinute: 100 } });
      const operator = await oauthClient(op.base); // oldest: an open form
      const mine = await consentOpen(oauthAuthorizeUrl(op.base, operator.client_id, oauthPkce().challenge));
      const other = await oauthClient(op.base); // a code not yet exchanged
      const { verifier, challenge } = oauthPkce();
      const code = consentCode(await consentSubmit(op.base, await consentOpen(oauthAuthorizeUrl(op.base, other.client_id, challenge))));
      for (let i = 0; i < 5; i++) assert.equal((await oauthRegister(op.base, { client_name: `flood ${i}` })).status, 201);
      consentCode(await consentSubmit(op.base, mine));
      const tokens = await oauthToken(op.base, other, { grant_type: 'authorization_code', code, code_verifier: verifier, redirect_uri: OAUTH_CALLBACK });
      assert.equal(tokens.status, 200, tokens.text);
      assert.equal(await oauthProbe(op.base, tokens.json.access_token), 404);
    }
  });

  it('consentTtlMs: a consent form answered after it expired is refused on the page', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { consentTtlMs: 200 } });
    const client = await oauthClient(op.base);
    const { challenge } = oauthPkce();
    const csrf = consentCsrf(await request(oauthAuthorizeUrl(op.base, client.client_id, challenge)))!;
    const shownAt = Date.now(); // the page's expiry was set before its answer left the proxy
    await waitFor(() => Date.now() > shownAt + 250, 2_000, 'the consent form to expire');
    const late = await consentSubmit(op.base, csrf);
    assert.equal(late.status, 400);
    assert.equal(late.headers.location, undefined);
  });

  // Tokens (/token) ───────

  it('code exchange: tokens bound to the server; wrong PKCE verifier → invalid_grant and nothing granted; the code still works with the right one', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const client = await oauthClient(op.base);
    const c = await oauthCode(op.base, client);
    for (const verifier of [oauthPkce().verifier, '', 'short', `${c.verifier}x`, c.verifier.toUpperCase()]) {
      assertOAuthError(await oauthExchange(op.base, client, c, { code_verifier: verifier }), 400, 'invalid_grant');
    }
    // The challenge itself is no verifier.
    assertOAuthError(await oauthExchange(op.base, client, c, { code_verifier: c.challenge }), 400, 'invalid_grant');
    assert.equal(oauthState(op).grants.length, 0, 'nothing granted');
    const ok = await oauthExchange(op.base, client, c);
    assert.equal(ok.status, 200, ok.text);
    assert.equal(ok.headers['cache-control'], 'no-store');
    assert.deepEqual(Object.keys(ok.json).sort(), ['access_token', 'expires_in', 'refresh_token', 'token_type']);
    assert.equal(ok.json.token_type, 'Bearer');
    assert.equal(ok.json.expires_in, DEFAULT_LIMITS.accessTokenTtlMs / 1000);
    assert.equal(await oauthProbe(op.base, ok.json.access_token, 'alpha'), 404, 'valid on alpha');
    assert.equal(await oauthProbe(op.base, ok.json.access_token, 'beta'), 403, 'refused on beta');
  });

  it('code exchange: a reused code → invalid_grant, and the grant of its first use is revoked (access and refresh tokens dead)', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const client = await oauthClient(op.base);
    const c = await oauthCode(op.base, client);
    const first = await oauthExchange(op.base, client, c);
    assert.equal(first.status, 200);
    assert.equal(await oauthProbe(op.base, first.json.access_token), 404);
    const again = await oauthExchange(op.base, client, c);
    assertOAuthError(again, 400, 'invalid_grant');
    assert.equal(await oauthProbe(op.base, first.json.access_token), 401, 'the access token of the first use is revoked');
    assertOAuthError(await oauthRefresh(op.base, client, first.json.refresh_token), 400, 'invalid_grant');
    assert.equal(oauthState(op).grants.length, 0);
  });

  it('authCodeTtlMs: an expired code → invalid_grant, nothing granted', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { authCodeTtlMs: 200 } });
    const client = await oauthClient(op.base);
    const c = await oauthCode(op.base, client);
    const issuedAt = Date.now(); // the code's expiry was set before the 303 left the proxy
    await waitFor(() => Date.now() > issuedAt + 250, 2_000, 'the code to expire');
    assertOAuthError(await oauthExchange(op.base, client, c), 400, 'invalid_grant');
    assert.equal(oauthState(op).grants.length, 0);
  });

  it('code exchange: another client, another redirect_uri, another resource, an unknown code, an unknown grant_type → the right error, nothing granted', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const client = await oauthClient(op.base);
    const other = await oauthClient(op.base);
    const c = await oauthCode(op.base, client);
    assertOAuthError(await oauthExchange(op.base, other, c), 400, 'invalid_grant');
    assertOAuthError(await oauthExchange(op.base, client, c, { redirect_uri: 'http://127.0.0.1:10/callback' }), 400, 'invalid_grant');
    assertOAuthError(await oauthExchange(op.base, client, c, { resource: `${op.base}/beta/mcp` }), 400, 'invalid_target');
    assertOAuthError(await oauthExchange(op.base, client, c, { code: 'not-a-code' }), 400, 'invalid_grant');
    assertOAuthError(await oauthToken(op.base, client, { grant_type: 'password', username: 'a', password: 'b' }), 400, 'unsupported_grant_type');
    assertOAuthError(await oauthToken(op.base, client, {}), 400, 'unsupported_grant_type');
    assert.equal((await request(`${op.base}/token`)).status, 405);
    assert.equal(oauthState(op).grants.length, 0);
    // The code was not used up by any of these.
    assert.equal((await oauthExchange(op.base, client, c)).status, 200);
  });

  it('resource of another server: a token for memory gets 403 insufficient_scope on everything (both transports); "allow every server" and a request without resource cover both', { timeout: 30_000 }, async (t) => {
    const op = await oauthProxy(t, REAL_TWO());
    await op.h.proxy.ready();
    const memory = await oauthGrant(op.base, 'memory');
    for (const leaf of ['mcp', 'sse']) {
      const res = leaf === 'mcp'
        ? await post(`${op.base}/everything/mcp`, initMsg(0), bearer(memory.access))
        : await request(`${op.base}/everything/sse`, { headers: { accept: 'text/event-stream', ...bearer(memory.access) } });
      assertRpcError(res, 403, -32000);
      assert.equal(res.headers['www-authenticate'], `Bearer error="insufficient_scope", resource_metadata="${op.base}/.well-known/oauth-protected-resource/everything/${leaf}"`);
    }
    const sid = await oauthSession(op.base, 'memory', memory.access);
    assert.ok(sid, 'the memory token works on memory');
    // Refreshing it for another server's resource is refused, and the grant keeps working for its own.
    assertOAuthError(await oauthRefresh(op.base, memory.client, memory.refresh, { resource: `${op.base}/everything/mcp` }), 400, 'invalid_target');
    const own = await oauthRefresh(op.base, memory.client, memory.refresh, { resource: `${op.base}/memory/sse` });
    assert.equal(own.status, 200, own.text);
    assert.equal(await oauthProbe(op.base, own.json.access_token, 'everything'), 403);
    // Approved for every server: the checkbox, or a request that named no resource.
    const all = await oauthGrant(op.base, 'memory', { all: true });
    const none = await oauthGrant(op.base, 'memory', { resource: null });
    for (const g of [all, none]) {
      assert.equal(await oauthProbe(op.base, g.access, 'everything'), 404);
      assert.equal(await oauthProbe(op.base, g.access, 'memory'), 404);
    }
  });

  it('tampered and expired access tokens → 401 with error="invalid_token"', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { accessTokenTtlMs: 1_000 } });
    const g = await oauthGrant(op.base);
    const flip = (s: string, i: number) => s.slice(0, i) + (s[i] === 'A' ? 'B' : 'A') + s.slice(i + 1);
    for (const tampered of [flip(g.access, 0), flip(g.access, g.access.length - 1), `${g.access}x`, g.access.slice(0, -1), g.refresh, g.client.client_secret]) {
      const res = await post(`${op.base}/alpha/mcp`, initMsg(0), bearer(tampered));
      assertRpcError(res, 401, -32000);
      assert.equal(bearerParams(res.headers['www-authenticate'] as string).error, 'invalid_token');
    }
    await waitFor(async () => (await oauthProbe(op.base, g.access)) === 401, 5_000, 'the access token to expire');
    const expired = await post(`${op.base}/alpha/mcp`, initMsg(0), bearer(g.access));
    assertRpcError(expired, 401, -32000);
    assert.equal(expired.headers['www-authenticate'], `Bearer resource_metadata="${op.base}/.well-known/oauth-protected-resource/alpha/mcp", error="invalid_token"`);
    // The refresh token still gives a working one.
    const refreshed = await oauthRefresh(op.base, g.client, g.refresh);
    assert.equal(refreshed.status, 200);
    assert.equal(await oauthProbe(op.base, refreshed.json.access_token), 404);
  });

  // Since e28b5de earlier access tokens stay valid until they expire (a refresh cut off requests in flight, and
  // concurrent refreshes revoked the grant), four at most per grant; lost answers get successors, four at most.
  it('refresh rotation: each refresh gives new tokens; the access tokens issued before stay valid until they expire, the newest four at most; a rotated refresh token used again → invalid_grant and the grant is revoked', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const g = await oauthGrant(op.base);
    const access = [g.access];
    const refresh = [g.refresh];
    for (let i = 1; i <= 4; i++) {
      const next = await oauthRefresh(op.base, g.client, refresh.at(-1)!);
      assert.equal(next.status, 200, next.text);
      assert.ok(!access.includes(next.json.access_token) && !refresh.includes(next.json.refresh_token), 'new tokens');
      access.push(next.json.access_token);
      refresh.push(next.json.refresh_token);
      // Under and at four: every access token issued still works; over: the oldest is refused.
      const expected = access.map((_, j) => (j < access.length - 4 ? 401 : 404));
      assert.deepEqual(await Promise.all(access.map((a) => oauthProbe(op.base, a))), expected, `after refresh ${i}`);
    }
    // refresh[0] was rotated out when its successor was used: presenting it again revokes the whole grant.
    assertOAuthError(await oauthRefresh(op.base, g.client, refresh[0]!), 400, 'invalid_grant');
    assert.deepEqual(await Promise.all(access.map((a) => oauthProbe(op.base, a))), access.map(() => 401), 'the whole grant is revoked');
    for (const r of refresh.slice(1)) assertOAuthError(await oauthRefresh(op.base, g.client, r), 400, 'invalid_grant');
    assert.equal(oauthState(op).grants.length, 0);
  });

  it('refresh rotation tolerates lost answers and concurrent refreshes: the previous refresh token gets up to four successors until one is first used, then it revokes the grant', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const g = await oauthGrant(op.base);
    const r1 = g.refresh;
    const lost = await oauthRefresh(op.base, g.client, r1); // this answer never reaches the client
    assert.equal(lost.status, 200);
    const retried = await oauthRefresh(op.base, g.client, r1);
    assert.equal(retried.status, 200, `the previous token works again: ${retried.text}`);
    assert.notEqual(retried.json.refresh_token, lost.json.refresh_token);
    assert.equal(await oauthProbe(op.base, retried.json.access_token), 404);
    assert.equal(await oauthProbe(op.base, lost.json.access_token), 404, 'the lost access token stays valid until it expires');
    const next = await oauthRefresh(op.base, g.client, retried.json.refresh_token); // a successor is used
    assert.equal(next.status, 200);
    assertOAuthError(await oauthRefresh(op.base, g.client, r1), 400, 'invalid_grant');
    assert.equal(await oauthProbe(op.base, next.json.access_token), 401, 'reuse after that revokes the grant');
    assert.equal(oauthState(op).grants.length, 0);
    // Successors of one token: under and at four, each refresh works; over → invalid_grant, and the grant lives.
    const h = await oauthGrant(op.base);
    const successors: string[] = [];
    for (let i = 0; i < 4; i++) {
      const again = await oauthRefresh(op.base, h.client, h.refresh);
      assert.equal(again.status, 200, `successor ${i + 1}: ${again.text}`);
      successors.push(again.json.refresh_token);
    }
    const fifth = await oauthRefresh(op.base, h.client, h.refresh);
    assertOAuthError(fifth, 400, 'invalid_grant');
    assert.equal(fifth.json.error_description, 'This refresh token was replaced; use the newest one');
    const used = await oauthRefresh(op.base, h.client, successors[2]!);
    assert.equal(used.status, 200, 'the grant was not revoked');
    for (const other of [successors[0]!, h.refresh]) assertOAuthError(await oauthRefresh(op.base, h.client, other), 400, 'invalid_grant');
    assert.equal(await oauthProbe(op.base, used.json.access_token), 401, 'a retired successor used again revokes the grant');
  });

  // Hostile review (fixed in e28b5de): two refreshes at once revoked the grant.
  it('two concurrent refreshes with one refresh token: both 200, both access tokens work, the earlier access token stays valid until its own expiry, whichever refresh token the client keeps works next; a retired refresh token used later revokes the grant', { timeout: 15_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { accessTokenTtlMs: 1_500 } });
    const refresh = (g: OAuthGrant, refreshToken: string) => oauthRefresh(op.base, g.client, refreshToken);
    for (const keep of [0, 1]) {
      const g = await oauthGrant(op.base);
      const issuedMs = Date.now();
      const answers = await Promise.all([refresh(g, g.refresh), refresh(g, g.refresh)]);
      for (const a of answers) assert.equal(a.status, 200, a.text);
      assert.notEqual(answers[0].json.access_token, answers[1].json.access_token);
      assert.equal(await oauthProbe(op.base, answers[0].json.access_token), 404, 'the first answer\'s access token works');
      assert.equal(await oauthProbe(op.base, answers[1].json.access_token), 404, 'the second answer\'s access token works');
      assert.equal(await oauthProbe(op.base, g.access), 404, 'the access token from before the refresh still works');
      const next = await refresh(g, answers[keep].json.refresh_token);
      assert.equal(next.status, 200, `refresh with the kept token of answer ${keep}: ${next.text}`);
      assert.equal(await oauthProbe(op.base, next.json.access_token), 404);
      if (keep === 0) {
        // The first access token expires on its own clock (accessTokenTtlMs), not at a refresh.
        await waitFor(async () => (await oauthProbe(op.base, g.access)) === 401, 4_000, 'the first access token to expire');
        assert.ok(Date.now() - issuedMs >= 1_400, 'not before its expiry');
      } else {
        // The refresh token the client did not keep was retired when the kept one was used: using it now
        // means it leaked, and the whole grant goes.
        assertOAuthError(await refresh(g, answers[0].json.refresh_token), 400, 'invalid_grant');
        assert.ok(op.lines.some((l) => /^warn \[oauth\] a rotated refresh token was used again; revoked the grant of client /.test(l)), op.lines.join('\n'));
        assertOAuthError(await refresh(g, next.json.refresh_token), 400, 'invalid_grant');
        assert.equal(await oauthProbe(op.base, next.json.access_token), 401);
        assert.equal(await oauthProbe(op.base, answers[1].json.access_token), 401);
      }
    }
  });

  it('refresh: another client\'s refresh token, an unknown one, and one past refreshTokenTtlMs → invalid_grant', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { refreshTokenTtlMs: 300 } });
    const g = await oauthGrant(op.base);
    const other = await oauthClient(op.base);
    assertOAuthError(await oauthRefresh(op.base, other, g.refresh), 400, 'invalid_grant');
    assertOAuthError(await oauthRefresh(op.base, g.client, 'not-a-refresh-token'), 400, 'invalid_grant');
    assertOAuthError(await oauthRefresh(op.base, g.client, ''), 400, 'invalid_grant');
    const issuedAt = Date.now();
    await waitFor(() => Date.now() > issuedAt + 350, 2_000, 'the refresh token to expire');
    assertOAuthError(await oauthRefresh(op.base, g.client, g.refresh), 400, 'invalid_grant');
    assert.equal(oauthState(op).grants.length, 0);
  });

  it('client authentication at /token: client_secret_post and client_secret_basic (form-encoded id and secret) both work; unknown client, wrong secret or no secret → 401 invalid_client', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const basicClient = await oauthClient(op.base, { token_endpoint_auth_method: 'client_secret_basic' });
    const viaBasic = await oauthExchange(op.base, basicClient, await oauthCode(op.base, basicClient), {}, 'basic');
    assert.equal(viaBasic.status, 200, viaBasic.text);
    // Claude.ai sends client_secret_post even when registered for basic (claude-ai-mcp#667).
    const viaPost = await oauthExchange(op.base, basicClient, await oauthCode(op.base, basicClient), {}, 'post');
    assert.equal(viaPost.status, 200, viaPost.text);
    // A public client authenticates with its id alone.
    const pub = await oauthClient(op.base, { token_endpoint_auth_method: 'none' });
    const viaNone = await oauthExchange(op.base, pub, await oauthCode(op.base, pub), {}, 'none');
    assert.equal(viaNone.status, 200, viaNone.text);
    const other = await oauthClient(op.base);
    const c = await oauthCode(op.base, basicClient);
    const failures: [string, () => Promise<OAuthResponse>][] = [
      ['unknown client', () => oauthExchange(op.base, { client_id: 'no-such-client', client_secret: 'x' }, c)],
      ['wrong secret (post)', () => oauthExchange(op.base, { ...basicClient, client_secret: `${basicClient.client_secret}x` }, c)],
      ['wrong secret (basic)', () => oauthExchange(op.base, { ...basicClient, client_secret: 'nope' }, c, {}, 'basic')],
      ['no secret', () => oauthExchange(op.base, basicClient, c, {}, 'none')],
      ['another client\'s secret', () => oauthExchange(op.base, { ...basicClient, client_secret: other.client_secret }, c)],
      ['Basic without a colon', async () => withJson(await postForm(`${op.base}/token`, { grant_type: 'authorization_code', code: c.code }, { authorization: `Basic ${Buffer.from(basicClient.client_id).toString('base64')}` }))],
    ];
    for (const [what, attempt] of failures) {
      const res = await attempt();
      assertOAuthError(res, 401, 'invalid_client');
      assert.match(String(res.headers['www-authenticate']), /^Basic /, what);
    }
    assert.equal((await oauthExchange(op.base, basicClient, c)).status, 200, 'the code survived the failed attempts');
  });

  it('revocation (RFC 7009): an access or refresh token revokes its grant; unknown tokens and other clients\' tokens get 200 and change nothing; an unauthenticated client gets 401', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const revoke = (client: Json, token: string, how: ClientAuth = 'post') => {
      const form: Record<string, string> = { token };
      const headers: Record<string, string> = {};
      if (how === 'basic') headers.authorization = `Basic ${Buffer.from(`${client.client_id}:${client.client_secret}`).toString('base64')}`;
      else Object.assign(form, { client_id: client.client_id, client_secret: client.client_secret });
      return postForm(`${op.base}/revoke`, form, headers);
    };
    const a = await oauthGrant(op.base);
    assert.equal((await revoke(a.client, a.access)).status, 200);
    assert.equal(await oauthProbe(op.base, a.access), 401);
    assertOAuthError(await oauthRefresh(op.base, a.client, a.refresh), 400, 'invalid_grant');
    const b = await oauthGrant(op.base);
    assert.equal((await revoke(b.client, b.refresh, 'basic')).status, 200);
    assert.equal(await oauthProbe(op.base, b.access), 401);
    const c = await oauthGrant(op.base);
    const d = await oauthGrant(op.base);
    assert.equal((await revoke(d.client, c.access)).status, 200, 'another client\'s token: 200 ...');
    assert.equal(await oauthProbe(op.base, c.access), 404, '... and it still works');
    assert.equal((await revoke(c.client, 'no-such-token')).status, 200);
    const unauthenticated = withJson(await revoke({ client_id: 'nope', client_secret: 'nope' }, c.access));
    assertOAuthError(unauthenticated, 401, 'invalid_client');
    assert.equal(await oauthProbe(op.base, c.access), 404);
    assert.equal((await request(`${op.base}/revoke`)).status, 405);
    assert.equal(oauthState(op).grants.length, 2);
  });

  // Token use on the MCP endpoints ───────

  it('a token in the query string is not accepted: 401 without error, on /mcp, /sse and /messages', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const g = await oauthGrant(op.base);
    for (const param of ['access_token', 'token', 'auth']) {
      const q = `${param}=${encodeURIComponent(g.access)}`;
      const viaPost = await post(`${op.base}/alpha/mcp?${q}`, initMsg(0));
      assertRpcError(viaPost, 401, -32000);
      assert.equal(bearerParams(viaPost.headers['www-authenticate'] as string).error, undefined);
      assertRpcError(await request(`${op.base}/alpha/sse?${q}`, { headers: { accept: 'text/event-stream' } }), 401, -32000);
      assertRpcError(await post(`${op.base}/alpha/messages?sessionId=x&${q}`, ping(1)), 401, -32000);
    }
    // A form-encoded body token (RFC 6750 §2.2) is not accepted either.
    const viaBody = await request(`${op.base}/alpha/mcp`, { method: 'POST', headers: { ...FORM, accept: 'application/json' }, body: `access_token=${g.access}` });
    assert.equal(viaBody.status, 401);
  });

  it('a session belongs to the credential that opened it: another OAuth grant, a static token or no token with its id → 404 (Streamable and SSE); the owner keeps it across a refresh', { timeout: 20_000 }, async (t) => {
    const staticToken = 'static-token-0123456789abcdef';
    const op = await oauthProxy(t, TWO_FIXTURES(), { tokens: [staticToken] });
    await op.h.proxy.ready();
    const a = await oauthGrant(op.base);
    const b = await oauthGrant(op.base);
    const sid = await oauthSession(op.base, 'alpha', a.access);
    const withSid = (token: string) => post(`${op.base}/alpha/mcp`, ping(7), { accept: 'application/json', 'mcp-session-id': sid, ...bearer(token) });
    assertRpcError(await withSid(b.access), 404, -32001);
    assertRpcError(await withSid(staticToken), 404, -32001);
    assert.equal((await post(`${op.base}/alpha/mcp`, ping(7), { accept: 'application/json', 'mcp-session-id': sid })).status, 401);
    assert.equal((await withSid(a.access)).status, 200);
    // A session opened with the static token refuses the OAuth token.
    const staticSid = await oauthSession(op.base, 'alpha', staticToken);
    assertRpcError(await post(`${op.base}/alpha/mcp`, ping(8), { accept: 'application/json', 'mcp-session-id': staticSid, ...bearer(a.access) }), 404, -32001);
    assert.equal((await post(`${op.base}/alpha/mcp`, ping(8), { accept: 'application/json', 'mcp-session-id': staticSid, ...bearer(staticToken) })).status, 200);
    // After a refresh the grant, and so the session, is the same.
    const refreshed = await oauthRefresh(op.base, a.client, a.refresh);
    assert.equal((await withSid(refreshed.json.access_token)).status, 200);
    // Legacy SSE: the /messages POST of a stream opened with A refuses B.
    const stream = await openSse(`${op.base}/alpha/sse`, bearer(b.access));
    t.after(() => stream.close());
    const endpoint = await stream.next((e) => e.event === 'endpoint', 5_000, 'the endpoint event');
    const messages = `${op.base}${endpoint.data}`;
    assertRpcError(await post(messages, initMsg(0), bearer(refreshed.json.access_token)), 404, -32001);
    assertRpcError(await post(messages, initMsg(0), bearer(staticToken)), 404, -32001);
    assert.equal((await post(messages, initMsg(0), bearer(b.access))).status, 202);
    await stream.next((e) => e.event === 'message' && JSON.parse(e.data).id === 0, 5_000, 'the initialize answer');
  });

  it('a client pre-registered by the operator (Claude.ai\'s Advanced settings): client_secret_post on Claude\'s callback works, its secret is never persisted or logged, it is never evicted, and its grant survives a restart', { timeout: 30_000 }, async (t) => {
    const pre = { id: 'claude-connector', secret: 'pre-registered-secret-0123456789' };
    const client = { client_id: pre.id, client_secret: pre.secret };
    let op = await oauthProxy(t, TWO_FIXTURES(), { limits: { maxOAuthClients: 2 }, extra: { oauthClient: pre } });
    const { verifier, challenge } = oauthPkce();
    const resource = `${op.base}/alpha/mcp`;
    const { location } = await consentApprove(op.base, oauthAuthorizeUrl(op.base, pre.id, challenge, { redirectUri: CLAUDE_CALLBACK }));
    assert.equal(`${location.origin}${location.pathname}`, CLAUDE_CALLBACK);
    const code = location.searchParams.get('code')!;
    const params = { grant_type: 'authorization_code', code, code_verifier: verifier, redirect_uri: CLAUDE_CALLBACK, resource };
    assertOAuthError(await oauthToken(op.base, { ...client, client_secret: 'wrong-secret-0123456789' }, params), 401, 'invalid_client');
    const tokens = await oauthToken(op.base, client, params);
    assert.equal(tokens.status, 200, tokens.text);
    // Registrations past maxOAuthClients evict dynamic clients, never this one.
    for (let i = 0; i < 3; i++) assert.equal((await oauthRegister(op.base)).status, 201);
    assert.equal(await oauthProbe(op.base, tokens.json.access_token), 404);
    const state = fs.readFileSync(path.join(op.stateDir, STATE_FILE_NAME), 'utf8');
    assert.ok(!state.includes(pre.secret));
    assert.ok(!JSON.parse(state).clients.some((c: Json) => c.id === pre.id), 'not written to the state file');
    op = await oauthRestart(t, op, TWO_FIXTURES());
    assert.equal(await oauthProbe(op.base, tokens.json.access_token), 404, 'its grant survives a restart');
    const refreshed = await oauthRefresh(op.base, client, tokens.json.refresh_token, { resource });
    assert.equal(refreshed.status, 200, refreshed.text);
    for (const line of op.lines) assert.ok(!line.includes(pre.secret), line);
  });

  // Bounded maps ───────

  // Since e28b5de a client mid-login (an approval form open, or a code not yet exchanged) is never evicted either.
  it('maxOAuthClients: clients up to the limit are kept; one over evicts the oldest client holding no grant and not mid-login (no approval form open); with every client granted or mid-login → 503 temporarily_unavailable', { timeout: 30_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { maxOAuthClients: 3 } });
    const granted = await oauthGrant(op.base); // the oldest, but it holds a grant
    const c2 = await oauthClient(op.base);
    const c3 = await oauthClient(op.base); // at the limit: nobody evicted
    // Asked at /token, which opens no approval form (a consent page would make the client mid-login).
    for (const c of [granted.client, c2, c3]) assert.equal(await oauthKnownAtToken(op.base, c), true);
    // Only a client holding a grant is written to the state file; the others are registered in memory.
    assert.deepEqual(oauthState(op).clients.map((c: Json) => c.id), [granted.client.client_id]);
    const c4 = await oauthClient(op.base); // over: c2, the oldest unused, gives way
    assert.equal(await oauthKnownAtToken(op.base, c2), false);
    assert.equal(await oauthIsRegistered(op.base, c2.client_id), false);
    assert.equal(await oauthProbe(op.base, granted.access), 404, 'the granted client is kept');
    assert.equal((await oauthRefresh(op.base, granted.client, granted.refresh)).status, 200);
    for (const c of [c3, c4]) assert.equal(await oauthKnownAtToken(op.base, c), true);
    // c3 opens its approval form: mid-login, so the next registration evicts c4 instead, and c3 finishes.
    const { verifier, challenge } = oauthPkce();
    const page = await request(oauthAuthorizeUrl(op.base, c3.client_id, challenge));
    assert.equal(page.status, 200);
    const c5 = await oauthClient(op.base);
    assert.equal(await oauthKnownAtToken(op.base, c4), false, 'c4 gave way');
    assert.equal(await oauthKnownAtToken(op.base, c3), true, 'c3, mid-login, was kept');
    const approved = await consentSubmit(op.base, consentCsrf(page)!);
    assert.equal(approved.status, 303);
    const code = new URL(String(approved.headers.location)).searchParams.get('code')!;
    const c3Tokens = await oauthExchange(op.base, c3, { code, verifier, challenge, resource: `${op.base}/alpha/mcp`, location: new URL(String(approved.headers.location)) });
    assert.equal(c3Tokens.status, 200, c3Tokens.text);
    // c5 opens its form too: every client is granted or mid-login, so no one can give way.
    assert.equal((await request(oauthAuthorizeUrl(op.base, c5.client_id, challenge))).status, 200);
    const refused = await oauthRegister(op.base);
    assertOAuthError(refused, 503, 'temporarily_unavailable');
    assert.equal(refused.json.error_description, 'Too many registered clients');
    assert.equal(refused.headers['retry-after'], String(DEFAULT_LIMITS.retryAfterS));
    assert.equal(refused.json.client_id, undefined);
    for (const c of [granted.client, c3, c5]) assert.equal(await oauthKnownAtToken(op.base, c), true);
    assert.deepEqual(oauthState(op).clients.map((c: Json) => c.id).sort(), [granted.client.client_id, c3.client_id].sort());
  });

  it('maxOAuthGrants: grants up to the limit are issued; one over → 503 temporarily_unavailable with nothing granted, and its code works once a grant is revoked', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { maxOAuthGrants: 2 } });
    const first = await oauthGrant(op.base);
    await oauthGrant(op.base); // at the limit
    const client = await oauthClient(op.base);
    const c = await oauthCode(op.base, client);
    const over = await oauthExchange(op.base, client, c);
    assertOAuthError(over, 503, 'temporarily_unavailable');
    assert.ok(over.headers['retry-after']);
    assert.equal(oauthState(op).grants.length, 2);
    // A refresh is no new grant: it still works at the limit.
    const refreshed = await oauthRefresh(op.base, first.client, first.refresh);
    assert.equal(refreshed.status, 200);
    assert.equal((await postForm(`${op.base}/revoke`, { token: refreshed.json.access_token, client_id: first.client.client_id, client_secret: first.client.client_secret })).status, 200);
    const now = await oauthExchange(op.base, client, c);
    assert.equal(now.status, 200, now.text);
    assert.equal(oauthState(op).grants.length, 2);
  });

  it('maxAuthCodes: codes up to the limit can all be exchanged; one over drops the oldest, which then → invalid_grant', { timeout: 20_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES(), { limits: { maxAuthCodes: 2 } });
    const client = await oauthClient(op.base);
    // Under and at.
    const atLimit = [await oauthCode(op.base, client), await oauthCode(op.base, client)];
    for (const c of atLimit) assert.equal((await oauthExchange(op.base, client, c)).status, 200);
    // Over (the used codes above are dropped first, then the oldest unused one).
    const [oldest, second, third] = [await oauthCode(op.base, client), await oauthCode(op.base, client), await oauthCode(op.base, client)];
    assertOAuthError(await oauthExchange(op.base, client, oldest), 400, 'invalid_grant');
    assert.equal((await oauthExchange(op.base, client, second)).status, 200);
    assert.equal((await oauthExchange(op.base, client, third)).status, 200);
    assert.equal(oauthState(op).grants.length, 4);
  });

  // The state file ───────

  it('state file: mode 0600, written atomically, holds hashes only (no token, code, or client secret), and grants survive a restart', { timeout: 30_000 }, async (t) => {
    let op = await oauthProxy(t, TWO_FIXTURES());
    const file = path.join(op.stateDir, STATE_FILE_NAME);
    assert.equal(fs.statSync(file).mode & 0o777, 0o600, 'created 0600 at start');
    const g = await oauthGrant(op.base);
    const refreshed = await oauthRefresh(op.base, g.client, g.refresh);
    assert.equal(fs.statSync(file).mode & 0o777, 0o600, 'still 0600 after writes');
    assert.deepEqual(fs.readdirSync(op.stateDir), [STATE_FILE_NAME], 'no temporary file left behind');
    const text = fs.readFileSync(file, 'utf8');
    for (const secret of [g.access, g.refresh, g.client.client_secret, g.code.code, g.code.verifier, refreshed.json.access_token, refreshed.json.refresh_token, PASSPHRASE]) {
      assert.ok(!text.includes(secret), 'a secret in the state file');
    }
    const state = JSON.parse(text);
    assert.equal(state.version, STATE_FILE_VERSION);
    assert.equal(state.clients.length, 1);
    assert.equal(state.grants.length, 1);
    op = await oauthRestart(t, op, TWO_FIXTURES());
    assert.equal(await oauthProbe(op.base, refreshed.json.access_token), 404, 'the access token survives the restart');
    assert.equal((await oauthRefresh(op.base, g.client, refreshed.json.refresh_token)).status, 200, 'so does the refresh token');
    assertOAuthError(await oauthRefresh(op.base, g.client, g.refresh), 400, 'invalid_grant'); // retired before the restart: reuse detected
    assert.equal(oauthState(op).grants.length, 0, 'and reuse still revokes after a restart');
  });

  it('a corrupt state file is moved aside and reported at error level, never silently emptied; the proxy starts with no grants', { timeout: 30_000 }, async (t) => {
    const other = `not a version ${STATE_FILE_VERSION} state file`;
    for (const [content, why] of [
      ['{"version": 1, "clients": [', 'not valid JSON'],
      [JSON.stringify({ version: STATE_FILE_VERSION + 1, clients: [], grants: [] }), other],
      ['[]', other],
    ] as const) {
      const stateDir = tmpDir('oauth-corrupt');
      fs.writeFileSync(path.join(stateDir, STATE_FILE_NAME), content, { mode: 0o600 });
      const op = await oauthProxy(t, TWO_FIXTURES(), { stateDir });
      const aside = fs.readdirSync(stateDir).filter((f) => f.startsWith(`${STATE_FILE_NAME}.corrupt-`));
      assert.equal(aside.length, 1, `moved aside: ${fs.readdirSync(stateDir).join(', ')}`);
      assert.equal(fs.readFileSync(path.join(stateDir, aside[0]), 'utf8'), content, 'kept as it was');
      const reported = op.lines.filter((l) => l.startsWith('error ') && l.includes(STATE_FILE_NAME));
      assert.equal(reported.length, 1, op.lines.join('\n'));
      assert.ok(reported[0]!.includes(`${path.join(stateDir, STATE_FILE_NAME)}: ${why}; moved it to ${path.join(stateDir, aside[0]!)} and started with no grants`), reported[0]);
      const fresh = oauthState(op);
      assert.equal(fresh.version, STATE_FILE_VERSION);
      assert.deepEqual([fresh.clients, fresh.grants], [[], []]);
      assert.ok((await oauthGrant(op.base)).access, 'and it works');
      await op.stop();
    }
  });

  it('a state file larger than maxStateFileBytes is moved aside and reported', { timeout: 20_000 }, async (t) => {
    const stateDir = tmpDir('oauth-big');
    const big = JSON.stringify({ version: 1, clients: [], grants: [], pad: 'x'.repeat(4096) });
    fs.writeFileSync(path.join(stateDir, STATE_FILE_NAME), big, { mode: 0o600 });
    const op = await oauthProxy(t, TWO_FIXTURES(), { stateDir, limits: { maxStateFileBytes: 4096 } });
    assert.equal(fs.readdirSync(stateDir).filter((f) => f.includes('.corrupt-')).length, 1);
    assert.ok(op.lines.some((l) => l.startsWith('error ') && /larger than 4096 bytes/.test(l)), op.lines.join('\n'));
  });

  it('a state file that parses but holds a malformed grant is reported and moved aside; start-up does not crash', { timeout: 20_000 }, async (t) => {
    const stateDir = tmpDir('oauth-malformed');
    const malformed = JSON.stringify({
      version: STATE_FILE_VERSION,
      clients: [{ id: 'c1', secretHash: null, name: 'x', redirectUris: [OAUTH_CALLBACK], authMethod: 'none', createdAtMs: 0 }],
      grants: [{ id: 'g1', clientId: 'c1', audience: 'alpha', access: [{ hash: 'aa' }] }], // a short hash, no refresh hashes
    });
    const file = path.join(stateDir, STATE_FILE_NAME);
    fs.writeFileSync(file, malformed, { mode: 0o600 });
    const op = await oauthProxy(t, TWO_FIXTURES(), { stateDir });
    const aside = fs.readdirSync(stateDir).filter((f) => f.includes('.corrupt-'));
    assert.equal(aside.length, 1);
    assert.deepEqual(op.lines.filter((l) => l.startsWith('error ')), [
      `error [oauth] ${file}: holds a malformed client or grant; moved it to ${path.join(stateDir, aside[0]!)} and started with no grants (clients must log in again)`,
    ]);
  });

  // Hostile review (fixed in e28b5de): the temporary file had a predictable name and was opened without O_EXCL.
  it('state file: a symlink or a 0666 file planted at the (old) temp name is not written through or reused, the state file is a fresh regular 0600 file; a state dir with mode 0777 logs warn "writable by other users"', { timeout: 15_000 }, async (t) => {
    const dir = tmpDir('state');
    fs.chmodSync(dir, 0o777);
    const victim = path.join(tmpDir('victim'), 'victim.txt');
    fs.writeFileSync(victim, 'IMPORTANT USER DATA\n');
    // Where the code before e28b5de wrote its temp file (oauth-state.json.PID.tmp): one symlink and one wide
    // regular file would both be written through; now a fresh random name is created exclusively.
    const planted = path.join(dir, `${STATE_FILE_NAME}.${process.pid}.tmp`);
    fs.symlinkSync(victim, planted);
    const op = await oauthProxy(t, TWO_FIXTURES(), { stateDir: dir }); // saves once at start-up
    assert.equal(fs.readFileSync(victim, 'utf8'), 'IMPORTANT USER DATA\n');
    // Now a regular file anyone may read, at the same name: the next save must not reuse it (nor its mode).
    fs.rmSync(planted, { force: true });
    fs.writeFileSync(planted, '');
    fs.chmodSync(planted, 0o666);
    const g = await oauthGrant(op.base); // saves again, with a grant
    assert.ok(fs.existsSync(planted) && fs.readFileSync(planted, 'utf8') === '', 'the planted file is neither written nor moved into place');
    const file = path.join(dir, STATE_FILE_NAME);
    const st = fs.lstatSync(file);
    assert.ok(st.isFile() && !st.isSymbolicLink(), 'the state file is a regular file');
    assert.equal(st.mode & 0o777, 0o600);
    assert.equal(JSON.parse(fs.readFileSync(file, 'utf8')).grants.length, 1);
    assert.equal(await oauthProbe(op.base, g.access), 404);
    assert.deepEqual(fs.readdirSync(dir).filter((f) => f.endsWith('.tmp')), [path.basename(planted)], 'no temp file of its own left behind');
    assert.ok(op.lines.includes(`warn [oauth] the state directory ${dir} is writable by other users; make it 0700 (it holds token hashes)`), op.lines.join('\n'));
    // A 0700 directory draws no warning.
    const quiet = await oauthProxy(t, TWO_FIXTURES(), { stateDir: tmpDir('state') });
    assert.ok(!quiet.lines.some((l) => l.includes('writable by other users')), quiet.lines.join('\n'));
  });

  // Since fba7c1f a version-1 state file (before e28b5de: one access and one refresh token per grant) is
  // migrated; before, it was reported as corrupt and moved aside, logging out every client on upgrade.
  it('a version-1 state file is migrated at start, not moved aside: a fresh grant and a refreshed one keep working (their access and refresh tokens), no error is logged, and the next save writes version 2, which survives a restart', { timeout: 30_000 }, async (t) => {
    let op = await oauthProxy(t, TWO_FIXTURES());
    const file = path.join(op.stateDir, STATE_FILE_NAME);
    const hash = (token: string) => createHash('sha256').update(token).digest('hex');
    const fresh = await oauthGrant(op.base);
    const old = await oauthGrant(op.base, 'beta');
    const rotated = await oauthRefresh(op.base, old.client, old.refresh);
    assert.equal(rotated.status, 200, rotated.text);
    const refreshed = { ...old, access: rotated.json.access_token as string, refresh: rotated.json.refresh_token as string, previous: old.refresh };
    await op.stop();
    // Each grant as version 1 (e28b5de^) held it: the newest access token and its expiry, the newest refresh
    // token, the one before it (valid until the newest is first used), the retired ones.
    const v2 = JSON.parse(fs.readFileSync(file, 'utf8'));
    assert.equal(v2.version, 2);
    const asVersion1 = (g: { client: Json; access: string; refresh: string }, previous: string | null) => {
      const stored = v2.grants.find((x: Json) => x.clientId === g.client.client_id);
      const access = stored.access.find((a: Json) => a.hash === hash(g.access));
      assert.ok(access, 'the state file holds SHA-256 hashes of the access tokens');
      assert.ok(stored.refreshHashes.includes(hash(g.refresh)));
      assert.equal(stored.previousRefreshHash, previous === null ? null : hash(previous));
      assert.deepEqual(stored.retiredRefreshHashes, []);
      return {
        id: stored.id, clientId: stored.clientId, audience: stored.audience, accessHash: access.hash, accessExpiresMs: access.expiresMs,
        refreshHash: hash(g.refresh), previousRefreshHash: stored.previousRefreshHash, retiredRefreshHashes: [], refreshExpiresMs: stored.refreshExpiresMs,
        createdAtMs: stored.createdAtMs,
      };
    };
    const v1 = { version: 1, clients: v2.clients, grants: [asVersion1(fresh, null), asVersion1(refreshed, refreshed.previous)] };
    fs.writeFileSync(file, JSON.stringify(v1), { mode: 0o600 });
    op = await oauthRestart(t, op, TWO_FIXTURES());
    assert.deepEqual(op.lines.filter((l) => l.startsWith('error ')), []);
    assert.deepEqual(fs.readdirSync(op.stateDir).filter((f) => f.includes('.corrupt-')), [], 'nothing moved aside');
    assert.ok(op.lines.includes(`info [oauth] loaded 2 clients and 2 grants from ${file}`), op.lines.join('\n'));
    assert.equal(await oauthProbe(op.base, fresh.access), 404, 'the fresh grant\'s access token works');
    assert.equal(await oauthProbe(op.base, refreshed.access, 'beta'), 404, 'the refreshed grant\'s newest access token works');
    assert.equal(await oauthProbe(op.base, old.access, 'beta'), 401, 'the access token version 1 no longer held does not');
    const next = [await oauthRefresh(op.base, fresh.client, fresh.refresh), await oauthRefresh(op.base, refreshed.client, refreshed.refresh)];
    for (const res of next) assert.equal(res.status, 200, res.text);
    assert.equal(await oauthProbe(op.base, next[0].json.access_token), 404);
    assert.equal(await oauthProbe(op.base, next[1].json.access_token, 'beta'), 404);
    const saved = oauthState(op);
    assert.equal(saved.version, STATE_FILE_VERSION);
    assert.equal(saved.grants.length, 2);
    // Written as version 2, the migrated grants survive another restart, and rotation goes on from them.
    op = await oauthRestart(t, op, TWO_FIXTURES());
    assert.deepEqual(op.lines.filter((l) => l.startsWith('error ')), []);
    assert.equal(await oauthProbe(op.base, next[0].json.access_token), 404);
    assert.equal((await oauthRefresh(op.base, fresh.client, next[0].json.refresh_token)).status, 200);
    assert.equal((await oauthRefresh(op.base, refreshed.client, next[1].json.refresh_token)).status, 200);
    // The refresh token version 1 held as "previous" was retired once its successor was used: reuse revokes.
    assertOAuthError(await oauthRefresh(op.base, refreshed.client, refreshed.previous), 400, 'invalid_grant');
    assert.equal(await oauthProbe(op.base, next[1].json.access_token, 'beta'), 401);
  });

  // Was "registrations up to maxOAuthClients of maxOAuthBodyBytes each": registrations are no longer written
  // (8267da8), so what can grow the file is grants, each with its own client of bounded metadata. The four long
  // redirect URIs are padded with '"' (two bytes in JSON) or with U+0001 (six: "\u0001"). The U+0001 variant
  // failed until f8c09fd (three such granted clients were over maxStateFileBytes, so their state was not saved);
  // since then such URIs are refused, and those clients register the largest metadata that is accepted.
  for (const [pad, padName] of [['"', '\'"\''], ['\u0001', 'U+0001']] as const) {
    it(`what the limits let clients leave in the state file, it holds (redirect URIs padded with ${padName}): maxOAuthGrants grants, each of its own client with the largest metadata registration accepts and every retired refresh token kept, fit the defaults' per-grant share of maxStateFileBytes; registrations without a grant add nothing; all survive a restart`, { timeout: 30_000 }, async (t) => {
      // Defaults: 8 MiB for 1,000 grants, so about 8.4 KB per grant with its client. Scaled down: 3 grants, 3 shares.
      const grants = 3;
      const share = Math.floor(DEFAULT_LIMITS.maxStateFileBytes / DEFAULT_LIMITS.maxOAuthGrants);
      const limits = { maxOAuthGrants: grants, maxStateFileBytes: grants * share, registrationsPerMinute: 100 };
      let op = await oauthProxy(t, TWO_FIXTURES(), { limits });
      const file = path.join(op.stateDir, STATE_FILE_NAME);
      // A 100-character name (longer ones are cut) of lone surrogates, the most a name can take in JSON (six bytes
      // each: "\ud800"; '"' takes two), and five 512-character URIs.
      const largest = (i: number, fill: string) => ({
        client_name: '\ud800'.repeat(150),
        redirect_uris: [OAUTH_CALLBACK, ...Array.from({ length: 4 }, (_, j) => oauthLongUri(512, `c${i}-${j}`, fill))],
      });
      /** Registers the largest metadata padded with `pad`; if that is refused (only as invalid_redirect_uri), with '"'. */
      const register = async (i: number): Promise<Json> => {
        let res = await oauthRegister(op.base, largest(i, pad));
        if (res.status !== 201) {
          assertOAuthError(res, 400, 'invalid_redirect_uri');
          res = await oauthRegister(op.base, largest(i, '"'));
        }
        assert.equal(res.status, 201, res.text);
        return res.json;
      };
      const live: { client: Json; access: string; refresh: string }[] = [];
      for (let i = 0; i < grants; i++) {
        const client = await register(i);
        const granted = await oauthExchange(op.base, client, await oauthCode(op.base, client));
        assert.equal(granted.status, 200, granted.text);
        let { access_token: access, refresh_token: refresh } = granted.json;
        for (let r = 0; r < 9; r++) { // one more rotation than the retired refresh tokens a grant keeps (8)
          const next = await oauthRefresh(op.base, client, refresh);
          assert.equal(next.status, 200, next.text);
          ({ access_token: access, refresh_token: refresh } = next.json);
        }
        live.push({ client, access, refresh });
      }
      const size = fs.statSync(file).size;
      assert.ok(size <= limits.maxStateFileBytes, `${size} bytes for ${grants} grants, over ${limits.maxStateFileBytes}`);
      assert.equal(oauthState(op).grants.length, grants);
      for (let i = 0; i < 20; i++) await register(grants + i);
      assert.equal(fs.statSync(file).size, size, 'registrations without a grant add nothing to the state file');
      assert.deepEqual(op.lines.filter((l) => l.startsWith('error ')), []);
      op = await oauthRestart(t, op, TWO_FIXTURES());
      assert.deepEqual(op.lines.filter((l) => l.startsWith('error ')), []);
      assert.ok(op.lines.includes(`info [oauth] loaded ${grants} clients and ${grants} grants from ${file}`), op.lines.join('\n'));
      for (const g of live) {
        assert.equal(await oauthProbe(op.base, g.access), 404, 'the access token survives the restart');
        assert.equal((await oauthRefresh(op.base, g.client, g.refresh)).status, 200, 'so does the refresh token');
      }
    });
  }

  // Logs ───────

  it('no passphrase, client secret, code, verifier, csrf token, access or refresh token appears in any log line of a full flow (every level)', { timeout: 60_000 }, async (t) => {
    // A corrupt state file at start: an error-level line (the flow below logs at info, warn and debug).
    const stateDir = tmpDir('oauth-logs');
    fs.writeFileSync(path.join(stateDir, STATE_FILE_NAME), '{"version": 1, "clients": [', { mode: 0o600 });
    const op = await oauthProxy(t, REAL_TWO(), { stateDir, limits: { accessTokenTtlMs: 1_000, loginFailuresPerWindow: 2 } });
    await op.h.proxy.ready();
    const secrets = new Set<string>([PASSPHRASE]);
    // The SDK's flow, with a refresh.
    const callback = await sdkCallback(t);
    const provider = new SdkProvider(callback.url);
    const client = await sdkLogin(op, new URL(`${op.base}/everything/mcp`), 'mcp', provider, callback);
    await client.callTool({ name: 'echo', arguments: { message: 'x' } });
    const first = provider.saved!;
    await waitFor(async () => (await oauthProbe(op.base, first.access_token, 'everything')) === 401, 10_000, 'expiry');
    await client.callTool({ name: 'echo', arguments: { message: 'y' } });
    for (const tokens of provider.allTokens) [tokens.access_token, tokens.refresh_token ?? ''].forEach((s) => secrets.add(s));
    secrets.add(provider.verifier);
    secrets.add((provider.info as Json).client_secret);
    for (const hit of callback.hits) secrets.add(hit.searchParams.get('code') ?? '');
    // Raw: wrong passphrases (one a near miss) up to the 429, a reused code, a reused refresh token, a revocation.
    const raw = await oauthClient(op.base, { client_name: 'raw' });
    secrets.add(raw.client_secret);
    const { challenge } = oauthPkce();
    for (const attempt of ['correct horse battery stapler', 'hunter2-wrong-passphrase', PASSPHRASE]) {
      const csrf = consentCsrf(await request(oauthAuthorizeUrl(op.base, raw.client_id, challenge, { server: 'everything' })))!;
      secrets.add(csrf);
      secrets.add(attempt);
      await consentSubmit(op.base, csrf, attempt);
    }
    await op.stop(); // a fresh proxy for the rest: the failures above hit the 429
    const op2 = await oauthRestart(t, op, REAL_TWO());
    await op2.h.proxy.ready();
    // `raw` held no grant, so it was not written to the state file: it registers again after the restart.
    assert.equal(await oauthIsRegistered(op2.base, raw.client_id), false);
    const raw2 = await oauthClient(op2.base, { client_name: 'raw' });
    secrets.add(raw2.client_secret);
    const c = await oauthCode(op2.base, raw2, { server: 'everything' });
    [c.code, c.verifier].forEach((s) => secrets.add(s));
    const tok = await oauthExchange(op2.base, raw2, c);
    await oauthExchange(op2.base, raw2, c); // reuse: logged as a warning
    const g = await oauthGrant(op2.base, 'memory');
    [g.access, g.refresh, g.client.client_secret, g.code.code, g.code.verifier].forEach((s) => secrets.add(s));
    [tok.json.access_token, tok.json.refresh_token].forEach((s) => secrets.add(s));
    const r2 = await oauthRefresh(op2.base, g.client, g.refresh);
    const r3 = await oauthRefresh(op2.base, g.client, r2.json.refresh_token);
    await oauthRefresh(op2.base, g.client, g.refresh); // reuse: revokes, logged
    [r2.json.access_token, r2.json.refresh_token, r3.json.access_token, r3.json.refresh_token].forEach((s) => secrets.add(s));
    const h = await oauthGrant(op2.base, 'memory');
    [h.access, h.refresh, h.client.client_secret].forEach((s) => secrets.add(s));
    // A stray JSON-RPC response in a session opened with the token: a debug-level line.
    const sid = await oauthSession(op2.base, 'memory', h.access);
    assert.equal((await post(`${op2.base}/memory/mcp`, { jsonrpc: '2.0', id: 'stray', result: {} }, { 'mcp-session-id': sid, ...bearer(h.access) })).status, 202);
    await postForm(`${op2.base}/revoke`, { token: h.refresh, client_id: h.client.client_id, client_secret: h.client.client_secret });
    await post(`${op2.base}/memory/mcp?access_token=${h.access}`, initMsg(0));
    const lines = [...op.lines, ...op2.lines];
    // Every level is read: captureLog keeps every level (startProxy's logLevel filters only its own stderr logger).
    for (const level of ['debug', 'info', 'warn', 'error']) assert.ok(lines.some((l) => l.startsWith(`${level} [`)), `a ${level} line among:\n${lines.join('\n')}`);
    assert.ok(lines.some((l) => /registered client/.test(l)) && lines.some((l) => /wrong passphrase/.test(l)) && lines.some((l) => /used twice/.test(l)), `the flow was logged:\n${lines.join('\n')}`);
    secrets.delete('');
    for (const secret of secrets) {
      for (const line of lines) {
        assert.ok(!line.includes(secret), `a secret (${secret.slice(0, 4)}…) in the log line: ${line}`);
        if (secret.length >= 24) assert.ok(!line.includes(secret.slice(0, 16)), `the first 16 characters of a secret in: ${line}`);
      }
    }
  });

  // In a browser ───────

  it('the consent page in headless Chromium: it names the client, the redirect host and the server, runs no script, cannot be framed, refuses a wrong passphrase and approves with the right one; the browser lands on the callback with state, code and iss', { timeout: 60_000 }, async (t) => {
    assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing: this test needs Debian's chromium package (apt-get install chromium; .ci/run installs it)`);
    const op = await oauthProxy(t, TWO_FIXTURES());
    const callback = await sdkCallback(t);
    const received = () => callback.hits.filter((u) => u.pathname === '/callback'); // not the browser's /favicon.ico
    const client = await oauthClient(op.base, { client_name: 'Claude', redirect_uris: [callback.url] });
    const { verifier, challenge } = oauthPkce();
    const authorize = oauthAuthorizeUrl(op.base, client.client_id, challenge, { redirectUri: callback.url, state: 'state-42', server: 'alpha' });

    const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
    onCleanup(t, () => browser.close());
    const page = await browser.newPage();
    const consoleMessages: string[] = [];
    page.on('console', (m) => consoleMessages.push(m.text()));
    const response = await page.goto(authorize);
    assert.equal(response?.status(), 200);
    assert.match(response!.headers()['content-security-policy']!, /(^|; )frame-ancestors 'none'(;|$)/);
    assert.equal(await page.locator('script').count(), 0);
    assert.equal(await page.locator('h1').innerText(), 'Allow Claude?');
    const body = await page.locator('body').innerText();
    assert.ok(body.includes(`Sends you back to 127.0.0.1:${new URL(callback.url).port}`), body);
    assert.match(body, /a program on the computer where your browser runs/);
    assert.match(body, /the server alpha/);

    // Claude's own callback is named as Claude's (the README's screenshot is this page: CONSENT_SCREENSHOT=file.png).
    const claude = await oauthClient(op.base, { client_name: 'Claude', redirect_uris: [CLAUDE_CALLBACK] });
    const claudePage = await browser.newPage({ viewport: { width: 760, height: 460 } });
    assert.equal((await claudePage.goto(oauthAuthorizeUrl(op.base, claude.client_id, challenge, { redirectUri: CLAUDE_CALLBACK, server: 'alpha' })))?.status(), 200);
    assert.match(await claudePage.locator('.ok').innerText(), /Sends you back to claude\.ai: Claude\./);
    if (process.env.CONSENT_SCREENSHOT) await claudePage.screenshot({ path: process.env.CONSENT_SCREENSHOT });

    // Framed by another origin: the browser does not render it (frame-ancestors 'none'). setContent waits for
    // the load event, which waits for the frame's navigation to end (here in Chromium's error page).
    const framer = await browser.newPage();
    await framer.setContent(`<iframe src="${authorize}" width="600" height="400"></iframe>`);
    const frame = framer.frames().find((f) => f !== framer.mainFrame());
    assert.ok(frame, 'the iframe is there');
    assert.equal(await frame.locator('form').count(), 0, 'the consent form must not render inside a frame');

    // A wrong passphrase first: the page says so and nothing reaches the client.
    await page.fill('input[name=passphrase]', 'wrong passphrase!!');
    await Promise.all([page.waitForNavigation(), page.click('button[value=approve]')]);
    assert.equal(await page.locator('.err').innerText(), 'Wrong passphrase.');
    assert.equal(received().length, 0);
    await page.fill('input[name=passphrase]', PASSPHRASE);
    await Promise.all([page.waitForURL(/\/callback\?/), page.click('button[value=approve]')]);
    assert.equal(received().length, 1);
    const landed = received()[0]!;
    assert.equal(landed.searchParams.get('state'), 'state-42');
    assert.match(landed.searchParams.get('code') ?? '', /^[A-Za-z0-9_-]{43}$/);
    assert.equal(landed.searchParams.get('iss'), op.base);
    assert.equal(await page.locator('body').innerText(), 'done, you can close this tab');
    // The one inline style is allowed by its hash; anything the CSP blocked would be reported here.
    assert.deepEqual(consoleMessages.filter((m) => /Content Security Policy/i.test(m)), []);
    // The code it carried is good for a token.
    const token = await oauthToken(op.base, client, {
      grant_type: 'authorization_code', code: landed.searchParams.get('code')!, code_verifier: verifier, redirect_uri: callback.url, resource: `${op.base}/alpha/mcp`,
    });
    assert.equal(token.status, 200, token.text);
  });
});

// ── 11. Operations: metrics and status page ─────────────────────────────────────────────────────────────

/** One sample of the text format: its metric name, labels (unescaped) and value. */
type Sample = { name: string; labels: Record<string, string>; value: number };
type Family = { type: string; help: string; samples: Sample[] };

const METRIC_NAME_RE = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME_RE = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
/** Go's ParseFloat, as the format says values are parsed: decimals, exponents, ±Inf, NaN. */
const SAMPLE_VALUE_RE = /^(?:[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN)$/;

/**
 * Parses Prometheus text format 0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/) strictly,
 * throwing on the first line that breaks the grammar: HELP and TYPE once per family and before its samples,
 * names and label names by their regexes, label values with only \\, \" and \n escapes, numeric values, no
 * duplicate series, and every histogram's buckets in increasing le ending at +Inf, cumulative, with _sum and a
 * _count equal to the +Inf bucket.
 */
function parseExposition(text: string): Map<string, Family> {
  assert.ok(text.endsWith('\n'), 'the exposition ends with a line feed');
  const families = new Map<string, Family>();
  const series = new Set<string>();
  let current: string | null = null;
  for (const [i, line] of text.slice(0, -1).split('\n').entries()) {
    const where = `line ${i + 1}: ${JSON.stringify(line)}`;
    const comment = /^# (HELP|TYPE) (\S+) (.*)$/.exec(line);
    if (comment) {
      const [, kind, name, rest] = comment as unknown as [string, string, string, string];
      assert.match(name, METRIC_NAME_RE, where);
      const family = families.get(name) ?? { type: '', help: '', samples: [] };
      if (family.samples.length) assert.fail(`${kind} after the samples of ${name}: ${where}`);
      if (kind === 'HELP') {
        assert.equal(family.help, '', `a second HELP: ${where}`);
        assert.ok(!/\\(?![\\n])/.test(rest), `HELP escapes only \\\\ and \\n: ${where}`);
        family.help = rest;
      } else {
        assert.equal(family.type, '', `a second TYPE: ${where}`);
        assert.match(rest, /^(counter|gauge|histogram|summary|untyped)$/, where);
        family.type = rest;
      }
      families.set(name, family);
      current = name;
      continue;
    }
    assert.ok(!line.startsWith('#') && line.trim() !== '', `only HELP, TYPE and samples are written: ${where}`);
    const sample = parseSampleLine(line, where);
    assert.ok(current, `a sample before any TYPE: ${where}`);
    const family = families.get(current)!;
    const own = family.type === 'histogram' ? [`${current}_bucket`, `${current}_sum`, `${current}_count`] : [current];
    assert.ok(own.includes(sample.name), `${sample.name} is not of the family ${current} (${family.type}): ${where}`);
    const key = `${sample.name}{${Object.entries(sample.labels).sort().map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(',')}}`;
    assert.ok(!series.has(key), `duplicate series ${key}`);
    series.add(key);
    family.samples.push(sample);
  }
  for (const [name, family] of families) {
    assert.ok(family.help && family.type, `${name} has HELP and TYPE`);
    assert.ok(family.samples.length > 0, `${name} has samples`);
    if (family.type === 'histogram') checkHistogram(name, family.samples);
  }
  return families;
}

function parseSampleLine(line: string, where: string): Sample {
  const name = /^[^{\s]+/.exec(line)?.[0] ?? '';
  assert.match(name, METRIC_NAME_RE, where);
  let at = name.length;
  const labels: Record<string, string> = {};
  if (line[at] === '{') {
    at++;
    while (line[at] !== '}') {
      const label = /^([^=]+)="/.exec(line.slice(at));
      assert.ok(label, `a label name="value": ${where}`);
      assert.match(label[1]!, LABEL_NAME_RE, where);
      at += label[0].length;
      let value = '';
      for (;;) {
        const c = line[at++];
        assert.ok(c !== undefined, `an unterminated label value: ${where}`);
        if (c === '"') break;
        if (c === '\\') {
          const e = line[at++];
          assert.ok(e === '\\' || e === '"' || e === 'n', `only \\\\, \\" and \\n are escapes: ${where}`);
          value += e === 'n' ? '\n' : e;
        } else value += c;
      }
      assert.ok(!(label[1]! in labels), `label ${label[1]} twice: ${where}`);
      labels[label[1]!] = value;
      if (line[at] === ',') at++;
      else assert.equal(line[at], '}', `labels are separated by commas: ${where}`);
    }
    at++;
  }
  const rest = line.slice(at);
  const value = /^ (\S+)(?: (-?\d+))?$/.exec(rest);
  assert.ok(value, `one space, a value and an optional timestamp: ${where}`);
  assert.match(value[1]!, SAMPLE_VALUE_RE, where);
  return { name, labels, value: Number(value[1]!.replace(/Inf$/, 'Infinity')) };
}

function checkHistogram(name: string, samples: Sample[]): void {
  const groups = new Map<string, Sample[]>();
  for (const s of samples) {
    const { le, ...rest } = s.labels;
    const key = JSON.stringify(Object.entries(rest).sort());
    if (s.name === `${name}_bucket`) assert.ok(le !== undefined, `${name}_bucket has le`);
    else assert.equal(le, undefined, `${s.name} has no le`);
    groups.set(key, [...(groups.get(key) ?? []), s]);
  }
  for (const [key, group] of groups) {
    const buckets = group.filter((s) => s.name === `${name}_bucket`);
    assert.ok(buckets.length >= 2, `${name}${key}: buckets`);
    const les = buckets.map((b) => b.labels.le!);
    assert.equal(les.at(-1), '+Inf', `${name}${key}: the last bucket is +Inf`);
    for (let i = 1; i < buckets.length; i++) {
      assert.ok(Number(les[i]!.replace('+Inf', 'Infinity')) > Number(les[i - 1]), `${name}${key}: le increases (${les[i - 1]}, ${les[i]})`);
      assert.ok(buckets[i]!.value >= buckets[i - 1]!.value, `${name}${key}: bucket counts are cumulative`);
    }
    const sums = group.filter((s) => s.name === `${name}_sum`);
    const counts = group.filter((s) => s.name === `${name}_count`);
    assert.equal(sums.length, 1, `${name}${key}: one _sum`);
    assert.equal(counts.length, 1, `${name}${key}: one _count`);
    assert.equal(counts[0]!.value, buckets.at(-1)!.value, `${name}${key}: _count equals the +Inf bucket`);
  }
}

/** The value of one series (0 when absent: counters start absent), found by name and exact labels. */
function metricValue(families: Map<string, Family>, name: string, labels: Record<string, string>): number {
  const family = families.get(name.replace(/_(bucket|sum|count)$/, '')) ?? families.get(name);
  const want = JSON.stringify(Object.entries(labels).sort());
  const found = family?.samples.filter((s) => s.name === name && JSON.stringify(Object.entries(s.labels).sort()) === want) ?? [];
  assert.ok(found.length <= 1, `one series ${name}${want}`);
  return found[0]?.value ?? 0;
}

async function scrape(base: string, headers: Record<string, string> = {}): Promise<Map<string, Family>> {
  const res = await request(`${base}/metrics`, { headers });
  assert.equal(res.status, 200, res.text);
  assert.equal(res.headers['content-type'], 'text/plain; version=0.0.4; charset=utf-8');
  return parseExposition(res.text);
}

/** A name with every character the format escapes except the line feed (config names cannot hold one). */
const ODD_NAME = 'odd "name" \\ 1';

describe('11. Operations: metrics and status page', () => {
  it('GET /metrics: every line parses as text format 0.0.4, label values are escaped, and counters move under a real SDK client (requests by method, bytes, latency); an unknown method counts as "other"', { timeout: 60_000 }, async (t) => {
    const h = await harness(t, { servers: [everything(), fixture(ODD_NAME)] }, { limits: FAST });
    await h.proxy.ready(30_000);
    const before = await scrape(h.url);
    const every = { server: 'everything' };
    assert.equal(metricValue(before, 'mcp_proxy_server_state', { ...every, state: 'ready' }), 1);
    assert.equal(metricValue(before, 'mcp_proxy_server_state', { ...every, state: 'errored' }), 0);
    assert.equal(metricValue(before, 'mcp_proxy_children_started_total', every), 1);
    assert.equal(metricValue(before, 'mcp_proxy_requests_total', { ...every, method: 'tools/call' }), 0);
    for (const name of ['mcp_proxy_process_resident_memory_bytes', 'mcp_proxy_uptime_seconds', 'mcp_proxy_process_open_fds']) {
      assert.ok(metricValue(before, name, {}) > 0, name);
    }

    // A real client: its initialize is answered by the proxy (not forwarded); list and calls are.
    const client = await h.client('everything', 'mcp');
    await client.listTools();
    const calls = 5;
    for (let i = 0; i < calls; i++) assert.equal(textOf(await client.callTool({ name: 'echo', arguments: { message: `hi ${i}` } })), `Echo: hi ${i}`);
    const sid = await rawSession(h.url, 'everything');
    const unknown = await post(`${h.url}/everything/mcp`, { jsonrpc: '2.0', id: 7, method: 'no/such-method', params: {} }, sessionHeaders(sid));
    assert.equal(onlyMessage(unknown).error.code, -32601);
    // The odd name's server: a call through its segment, so its series have samples to escape.
    const oddSid = await rawSession(h.url, serverSegment(ODD_NAME));
    const odd = await post(`${h.url}/${serverSegment(ODD_NAME)}/mcp`, call(3, { what: 'echo', text: 'x' }), sessionHeaders(oddSid));
    assert.equal(textOf(onlyMessage(odd).result), 'x');

    const res = await request(`${h.url}/metrics`);
    assert.equal(res.headers['cache-control'], 'no-store');
    assert.ok(res.text.includes('server="odd \\"name\\" \\\\ 1"'), 'the name is written escaped');
    const after = parseExposition(res.text);
    for (const name of after.keys()) assert.match(name, /^mcp_proxy_/);
    assert.equal(metricValue(after, 'mcp_proxy_requests_total', { ...every, method: 'tools/call' }), calls);
    assert.ok(metricValue(after, 'mcp_proxy_requests_total', { ...every, method: 'tools/list' }) >= 1);
    assert.equal(metricValue(after, 'mcp_proxy_requests_total', { ...every, method: 'initialize' }), 0, "clients' initialize is answered by the proxy");
    assert.equal(metricValue(after, 'mcp_proxy_requests_total', { ...every, method: 'other' }), 1);
    assert.equal(metricValue(after, 'mcp_proxy_request_errors_total', { ...every, method: 'other' }), 1);
    assert.equal(metricValue(after, 'mcp_proxy_request_errors_total', { ...every, method: 'tools/call' }), 0);
    assert.ok(!res.text.includes('no/such-method'), 'a method outside the list never becomes a label');
    const forwarded = after.get('mcp_proxy_requests_total')!.samples.filter((s) => s.labels.server === 'everything').reduce((sum, s) => sum + s.value, 0);
    assert.equal(metricValue(after, 'mcp_proxy_request_duration_seconds_count', every), forwarded, 'every forwarded request was answered and observed');
    assert.ok(metricValue(after, 'mcp_proxy_request_duration_seconds_sum', every) > 0);
    for (const name of ['mcp_proxy_child_stdin_bytes_total', 'mcp_proxy_child_stdout_bytes_total']) {
      assert.ok(metricValue(after, name, every) > metricValue(before, name, every), `${name} grew`);
    }
    assert.equal(metricValue(after, 'mcp_proxy_sessions', { ...every, transport: 'streamable' }), 2);
    assert.equal(metricValue(after, 'mcp_proxy_sessions', { ...every, transport: 'sse' }), 0);
    const oddLabels = { server: ODD_NAME, method: 'tools/call' };
    assert.equal(metricValue(after, 'mcp_proxy_requests_total', oddLabels), 1, 'the escaped label reads back as the name');
    await h.client('everything', 'sse');
    assert.equal(metricValue(await scrape(h.url), 'mcp_proxy_sessions', { ...every, transport: 'sse' }), 1);
  });

  it('a crash: restarts, children started and the last exit code; a child that gives up shows errored', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('crashy'), fixture('broken', 'initerror')] }, { limits: FAST, log: captureLog([]) });
    await waitFor(() => h.proxy.status().crashy!.state === 'ready', 10_000, 'crashy ready'); // broken never is: no ready()
    const sid = await rawSession(h.url, 'crashy');
    const died = await post(`${h.url}/crashy/mcp`, call(1, { what: 'die' }), sessionHeaders(sid));
    assert.equal(onlyMessage(died).error.code, -32005);
    await waitFor(() => h.proxy.status().crashy!.state === 'ready' && h.proxy.status().crashy!.restarts === 1, 10_000, 'crashy restarted');
    await waitFor(() => h.proxy.status().broken!.state === 'errored', 20_000, 'broken errored');
    const m = await scrape(h.url);
    const crashy = { server: 'crashy' };
    assert.equal(metricValue(m, 'mcp_proxy_restarts_total', crashy), 1);
    assert.equal(metricValue(m, 'mcp_proxy_children_started_total', crashy), 2);
    assert.equal(metricValue(m, 'mcp_proxy_last_exit_code', crashy), 1);
    assert.equal(metricValue(m, 'mcp_proxy_request_errors_total', { ...crashy, method: 'tools/call' }), 1);
    assert.equal(metricValue(m, 'mcp_proxy_server_state', { server: 'broken', state: 'errored' }), 1);
    assert.equal(metricValue(m, 'mcp_proxy_restarts_total', { server: 'broken' }), DEFAULT_LIMITS.maxUnstableRestarts);
    assert.equal(metricValue(m, 'mcp_proxy_children', { server: 'broken' }), 0);
  });

  it('/metrics and / are guarded like /mcp: 401 without a token or with a wrong one, 200 with it; an OAuth token for one server gets 403, one for every server 200', { timeout: 60_000 }, async (t) => {
    const token = 'ops-token-0123456789abcdef';
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST, tokens: [token] });
    for (const path of ['/metrics', '/']) {
      assertRpcError(await request(`${h.url}${path}`), 401, -32000);
      assertRpcError(await request(`${h.url}${path}`, { headers: { authorization: 'Bearer wrong-token-0123456789' } }), 401, -32000);
      const ok = await request(`${h.url}${path}`, { headers: { authorization: `Bearer ${token}` } });
      assert.equal(ok.status, 200, `${path}: ${ok.text}`);
      assert.equal(ok.headers['x-content-type-options'], 'nosniff');
      assert.equal(ok.headers['cache-control'], 'no-store');
      assertRpcError(await request(`${h.url}${path}`, { method: 'POST', headers: { authorization: `Bearer ${token}` }, body: '{}' }), 405, -32000);
    }
    const op = await oauthProxy(t, TWO_FIXTURES());
    const one = await oauthGrant(op.base, 'alpha');
    const all = await oauthGrant(op.base, 'alpha', { all: true });
    for (const path of ['/metrics', '/']) {
      assert.equal(await oauthProbe(op.base, one.access), 404, 'the one-server token is good for its server');
      assertRpcError(await request(`${op.base}${path}`, { headers: bearer(one.access) }), 403, -32000);
      assert.equal((await request(`${op.base}${path}`, { headers: bearer(all.access) })).status, 200, path);
      assertRpcError(await request(`${op.base}${path}`), 401, -32000);
    }
  });

  it('the status page in headless Chromium: each server with its state, restarts after a crash, masked recent errors and its URLs; no script, no request but the page, no CSP violation (STATUS_SCREENSHOT=file.png saves a screenshot)', { timeout: 60_000 }, async (t) => {
    assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing: this test needs Debian's chromium package (apt-get install chromium; .ci/run installs it)`);
    const secret = 'sk-status-page-SECRET-4242';
    const odd = '<i>odd</i> & "co"';
    const h = await harness(t, {
      servers: [everything(), fixture('crashy'), fixture('broken', 'initerror', { env: { API_KEY: secret }, secrets: [secret] }), fixture(odd)],
    }, { limits: FAST, log: captureLog([]) });
    await waitFor(() => h.proxy.status().crashy!.state === 'ready', 10_000, 'crashy ready'); // broken never is: no ready()
    const sid = await rawSession(h.url, 'crashy');
    assert.equal(onlyMessage(await post(`${h.url}/crashy/mcp`, call(1, { what: 'die' }), sessionHeaders(sid))).error.code, -32005);
    await waitFor(() => h.proxy.status().crashy!.state === 'ready' && h.proxy.status().crashy!.restarts === 1, 10_000, 'crashy restarted');
    await waitFor(() => h.proxy.status().broken!.state === 'errored', 20_000, 'broken errored');
    await waitFor(() => h.proxy.status().everything!.state === 'ready', 20_000, 'everything ready');
    await h.client('everything', 'mcp');

    const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
    onCleanup(t, () => browser.close());
    const page = await browser.newPage({ viewport: { width: 900, height: 1200 } });
    const requests: string[] = [];
    const consoleMessages: string[] = [];
    page.on('request', (r) => requests.push(r.url()));
    page.on('console', (m) => consoleMessages.push(m.text()));
    const response = await page.goto(`${h.url}/`);
    assert.equal(response?.status(), 200);
    const headers = response!.headers();
    assert.match(headers['content-security-policy']!, /^default-src 'none'; style-src 'sha256-[A-Za-z0-9+/]+=*'; frame-ancestors 'none'/);
    assert.equal(headers['x-frame-options'], 'DENY');
    assert.equal(await page.locator('script').count(), 0);
    assert.equal(await page.locator('meta[http-equiv=refresh]').getAttribute('content'), '10');

    const section = (name: string) => page.locator('section').filter({ has: page.locator('h2', { hasText: name }) });
    assert.deepEqual(await page.locator('section h2').allInnerTexts().then((all) => all.map((s) => s.replace(/\s*(ready|starting|restarting|errored|stopped)$/, ''))),
      ['everything', 'crashy', 'broken', odd]);
    assert.equal(await section('crashy').locator('.state').innerText(), 'ready');
    assert.equal(await section('crashy').locator('td.restarts').innerText(), '1');
    assert.match(await section('crashy').locator('td.exit').innerText(), /^exit 1, \d\d:\d\d:\d\d UTC$/);
    assert.match(await section('crashy').locator('.problems').innerText(), /exit 1 after \d+ ms; restarting/);
    assert.equal(await section('broken').locator('.state').innerText(), 'errored');
    assert.equal(await section('broken').locator('.problems li').count(), 5, 'the last RECENT_PROBLEMS_PER_SERVER lines');
    assert.match(await section('broken').locator('.problems').innerText(), /bad api key \*\*\*/);
    assert.equal(await section('everything').locator('td.sessions').innerText(), '1 Streamable HTTP, 0 SSE');
    assert.match(await section('everything').locator('td.uptime').innerText(), /^\d+ s$|min/);
    assert.deepEqual(await section('everything').locator('.urls code').allInnerTexts(), [`${h.url}/everything/mcp`, `${h.url}/everything/sse`]);
    // The odd name is text, not markup; its URL uses its segment.
    assert.equal(await page.locator('section i').count(), 0);
    assert.equal(await section(odd).locator('.urls code').first().innerText(), `${h.url}/${serverSegment(odd)}/mcp`);
    const html = await page.content();
    assert.ok(!html.includes(secret), 'the secret is masked on the page');
    assert.deepEqual(requests, [`${h.url}/`], 'the page loads nothing else');
    assert.deepEqual(consoleMessages.filter((m) => /Content Security Policy/i.test(m)), []);
    if (process.env.STATUS_SCREENSHOT) await page.screenshot({ path: process.env.STATUS_SCREENSHOT, fullPage: true });
  });
});

// ── TLS helpers: self-signed certificates made in pure Node (CI has no openssl CLI) ──────────────────────

/** One DER tag-length-value (ITU-T X.690 §8.1): definite lengths up to 64 KiB, enough for a certificate. */
function der(tag: number, ...parts: Buffer[]): Buffer {
  const body = Buffer.concat(parts);
  const n = body.length;
  const length = n < 0x80 ? [n] : n < 0x100 ? [0x81, n] : [0x82, n >> 8, n & 0xff];
  return Buffer.concat([Buffer.from([tag, ...length]), body]);
}
const derSeq = (...parts: Buffer[]): Buffer => der(0x30, ...parts);

/** An OBJECT IDENTIFIER (X.690 §8.19): first two arcs in one byte, the rest base-128. */
function derOid(oid: string): Buffer {
  const [first, second, ...rest] = oid.split('.').map(Number);
  const bytes = [40 * first + second];
  for (const arc of rest) {
    const groups = [arc & 0x7f];
    for (let v = arc >> 7; v > 0; v >>= 7) groups.unshift((v & 0x7f) | 0x80);
    bytes.push(...groups);
  }
  return der(0x06, Buffer.from(bytes));
}

/** UTCTime YYMMDDHHMMSSZ (RFC 5280 §4.1.2.5.1). */
const derUtcTime = (date: Date): Buffer => der(0x17, Buffer.from(date.toISOString().replace(/[-:T]|\.\d+/g, '').slice(2), 'ascii'));
/** A Name of one commonName (RFC 5280 §4.1.2.4). */
const derName = (cn: string): Buffer => derSeq(der(0x31, derSeq(derOid('2.5.4.3'), der(0x0c, Buffer.from(cn)))));

type TestCert = { cert: string; key: string; fingerprint: string };

/**
 * A self-signed X.509 v3 certificate (RFC 5280 §4.1) for 127.0.0.1 and localhost, on a fresh P-256 key,
 * signed with ecdsa-with-SHA256. `fingerprint` is what getPeerCertificate().fingerprint256 reports for it.
 */
function selfSignedCert(cn: string): TestCert {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  const ecdsaSha256 = derSeq(derOid('1.2.840.10045.4.3.2'));
  const san = derSeq(derOid('2.5.29.17'), der(0x04, derSeq(der(0x87, Buffer.from([127, 0, 0, 1])), der(0x82, Buffer.from('localhost')))));
  const now = Date.now();
  const tbs = derSeq(
    der(0xa0, der(0x02, Buffer.from([2]))), // [0] version v3
    der(0x02, Buffer.concat([Buffer.from([1]), randomBytes(8)])), // positive serial
    ecdsaSha256,
    derName(cn),
    derSeq(derUtcTime(new Date(now - 3_600_000)), derUtcTime(new Date(now + 24 * 3_600_000))),
    derName(cn),
    publicKey.export({ type: 'spki', format: 'der' }),
    der(0xa3, derSeq(san)), // [3] extensions
  );
  const signature = sign('sha256', tbs, privateKey); // DER ECDSA-Sig-Value, as the BIT STRING wants
  const certDer = derSeq(tbs, ecdsaSha256, der(0x03, Buffer.from([0]), signature));
  const cert = `-----BEGIN CERTIFICATE-----\n${certDer.toString('base64').replace(/.{64}/g, '$&\n')}\n-----END CERTIFICATE-----\n`;
  return { cert, key: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, fingerprint: new X509Certificate(cert).fingerprint256 };
}

/** Writes `content` beside `file` and renames it over the file, as editors and renewal tools do. */
function replaceByRename(file: string, content: string): void {
  fs.writeFileSync(`${file}.tmp`, content);
  fs.renameSync(`${file}.tmp`, file);
}

/** The fingerprint of the certificate a NEW TLS connection to the proxy presents (trusting `ca`). */
function newConnectionFingerprint(port: number, ca: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = https.get({ host: '127.0.0.1', port, path: '/healthz', agent: false, ca }, (res) => {
      res.resume();
      resolve((res.socket as tls.TLSSocket).getPeerCertificate().fingerprint256);
    });
    req.on('error', reject);
  });
}

/**
 * A fetch for the SDK's transports over node:https through `agent` (whose `ca` trusts the test certificates:
 * Node's global fetch reads NODE_EXTRA_CA_CERTS only at start). Each response's socket is recorded by method.
 */
function httpsFetch(agent: https.Agent, sockets: { method: string; socket: tls.TLSSocket }[]): typeof fetch {
  return ((input: string | URL | Request, init: RequestInit = {}) => new Promise<Response>((resolve, reject) => {
    const url = new URL(input instanceof Request ? input.url : String(input));
    const method = init.method ?? 'GET';
    const req = https.request(url, { method, headers: Object.fromEntries(new Headers(init.headers)), agent }, (res) => {
      sockets.push({ method, socket: res.socket as tls.TLSSocket });
      const headers = new Headers();
      for (const [name, value] of Object.entries(res.headers)) if (value !== undefined) headers.set(name, Array.isArray(value) ? value.join(', ') : value);
      const status = res.statusCode ?? 0;
      // 202 (a notification accepted) has no body: read to its end here, so the socket goes back to the agent.
      const noBody = status === 202 || status === 204 || status === 304;
      if (noBody) res.resume();
      resolve(new Response(noBody ? null : (Readable.toWeb(res) as ReadableStream), { status, headers }));
    });
    init.signal?.addEventListener('abort', () => req.destroy(new Error('aborted')));
    req.on('error', reject);
    req.end(init.body == null ? undefined : String(init.body));
  })) as typeof fetch;
}

/** fs.watch handles this process holds (process.getActiveResourcesInfo lists each as FSEventWrap). */
const fsWatchHandles = (): number => process.getActiveResourcesInfo().filter((name) => name === 'FSEventWrap').length;

// ── 12. Lifecycle: start, reload, shutdown ─────────────────────────────────────────────────────────────────────

describe('12. Lifecycle: start, reload, shutdown', () => {
  describe('reload: the config file watched by hand, only the difference applied', () => {
    /** A config entry for the fixture (FIXTURE_LOG set: the test sees what reached it). */
    const fx = (env: Record<string, string> = {}) => ({ command: NODE, args: ['-e', FIXTURE, 'ok'], env });
    const memory = { command: NODE, args: [MEMORY] };
    const json = (servers: Record<string, unknown>) => JSON.stringify({ mcpServers: servers }, null, 2);
    const sessionOf = (client: Client) => (client.transport as StreamableHTTPClientTransport).sessionId;
    const pidCall = async (client: Client) => Number(textOf(await client.callTool({ name: 'x', arguments: { what: 'pid' } })));

    async function watched(t: TestContext, file: string, lines: string[], limits: Partial<Limits> = FAST) {
      const loaded = loadConfigFile(file);
      assert.ok(loaded.config, loaded.errors.join('\n'));
      const h = await harness(t, loaded.config, { configPath: file, watchConfig: true, log: captureLog(lines), limits });
      await h.proxy.ready(15_000);
      return h;
    }

    it('a rewritten file: an added server answers, a removed one\'s clients get a clear error, a changed one restarts, an unchanged one keeps its session and child', { timeout: 60_000 }, async (t) => {
      const dir = tmpDir('reload');
      const file = path.join(dir, 'config.json');
      const hangLog = path.join(dir, 'hangs');
      fs.writeFileSync(file, json({ keep: memory, gone: fx({ FIXTURE_LOG: hangLog }), change: fx({ LEVEL: '1' }) }));
      const lines: string[] = [];
      const h = await watched(t, file, lines);
      const keep = await h.client('keep', 'mcp');
      const gone = await h.client('gone', 'mcp');
      const changeSse = await h.client('change', 'sse');
      const before = h.proxy.status();
      const keepSession = sessionOf(keep);
      const oldChangePid = await pidCall(changeSse);
      // A call in flight on the server about to be removed.
      const inFlight = gone.callTool({ name: 'x', arguments: { what: 'hang' } }).then(() => 'answered', (err: Error) => err.message);
      await waitFor(() => fileLines(hangLog).some((l) => l.startsWith('hang ')), 5_000, 'the call to reach the child');

      fs.writeFileSync(file, json({ keep: memory, change: fx({ LEVEL: '2' }), added: fx() }));
      await waitFor(() => h.proxy.status().added?.state === 'ready', 10_000, 'the added server to be ready');
      await waitFor(() => !h.proxy.status().gone, 5_000, 'the removed server to be gone');
      assert.match(await within(inFlight, 5_000, 'the in-flight call'), /removed from the proxy config/);
      // Its client's next request: 404, saying why.
      await assert.rejects(gone.listTools(), /removed from the proxy config/);
      const raw = await post(`${h.url}/gone/mcp`, { jsonrpc: '2.0', id: 1, method: 'ping' });
      assert.equal(raw.status, 404);
      assert.match(JSON.parse(raw.text).error.message, /removed from the proxy config/);

      // Unchanged: same child, same session, no reconnect.
      assert.equal(h.proxy.status().keep!.pid, before.keep!.pid);
      assert.ok((await keep.listTools()).tools.length > 0);
      assert.equal(sessionOf(keep), keepSession);
      // Changed: a new child with the new environment; the old session is over.
      await waitFor(() => h.proxy.status().change?.state === 'ready' && h.proxy.status().change!.pid !== before.change!.pid, 10_000, 'change restarted');
      await assert.rejects(pidCall(changeSse));
      const changed = await h.client('change', 'mcp');
      assert.notEqual(await pidCall(changed), oldChangePid);
      assert.equal(JSON.parse(textOf(await changed.callTool({ name: 'x', arguments: { what: 'env' } }))).LEVEL, '2');
      const added = await h.client('added', 'mcp');
      assert.equal(textOf(await added.callTool({ name: 'x', arguments: { what: 'echo', text: 'hi' } })), 'hi');

      const reloaded = lines.filter((l) => l.includes('reloaded'));
      assert.deepEqual(reloaded, [`info [config] reloaded ${file}: started "added"; stopped "gone"; restarted "change" (env.LEVEL changed); 1 unchanged`]);
      assert.ok(lines.some((l) => /^info \[added\] serving at http:\/\/127\.0\.0\.1:\d+\/added\/mcp /.test(l)), lines.join('\n'));
      // Each stop is logged at info with its reason.
      assert.ok(lines.some((l) => /^info \[gone\] pid \d+ stopped \(removed from the config\)$/.test(l)), lines.join('\n'));
      assert.ok(lines.some((l) => /^info \[change\] pid \d+ stopped \(its config changed\)$/.test(l)), lines.join('\n'));
      assert.ok(!pidAlive(before.gone!.pid!) && !pidAlive(before.change!.pid!), 'the old children are gone');
    });

    it('a rename-replace save and a Kubernetes-style ..data symlink swap are both seen; an invalid edit changes nothing and logs one precise line', { timeout: 60_000 }, async (t) => {
      const dir = tmpDir('reload-k8s');
      // The layout a ConfigMap volume has: config.json → ..data/config.json, ..data → ..2026_12_02_v1.
      const version = (n: number, servers: Record<string, unknown>) => {
        fs.mkdirSync(path.join(dir, `..v${n}`));
        fs.writeFileSync(path.join(dir, `..v${n}`, 'config.json'), json(servers));
      };
      version(1, { a: fx() });
      fs.symlinkSync('..v1', path.join(dir, '..data'));
      fs.symlinkSync('..data/config.json', path.join(dir, 'config.json'));
      const file = path.join(dir, 'config.json');
      const lines: string[] = [];
      const h = await watched(t, file, lines);
      const a = await h.client('a', 'mcp');
      const aPid = h.proxy.status().a!.pid;
      const aSession = sessionOf(a);

      // The kubelet's swap: a new version directory, a new link renamed over ..data, the old version removed.
      version(2, { a: fx(), b: fx() });
      fs.symlinkSync('..v2', path.join(dir, '..data_tmp'));
      fs.renameSync(path.join(dir, '..data_tmp'), path.join(dir, '..data'));
      fs.rmSync(path.join(dir, '..v1'), { recursive: true });
      await waitFor(() => h.proxy.status().b?.state === 'ready', 10_000, 'b after the symlink swap');
      const b = await h.client('b', 'mcp');
      assert.equal(textOf(await b.callTool({ name: 'x', arguments: { what: 'echo', text: 'b' } })), 'b');

      // An editor's save: a temporary file renamed over the config (here over the link itself).
      const tmp = path.join(dir, '.config.json.swp');
      fs.writeFileSync(tmp, json({ a: fx(), c: fx() }));
      fs.renameSync(tmp, file);
      await waitFor(() => h.proxy.status().c?.state === 'ready' && !h.proxy.status().b, 10_000, 'c added and b removed after the rename');

      // Invalid edits: a field of the wrong type, then broken JSON. Nothing changes; one line each.
      const countBefore = lines.length;
      fs.writeFileSync(file, json({ a: { command: NODE, args: 5 }, c: fx(), d: fx() }));
      const refused = await waitFor(() => lines.slice(countBefore).find((l) => l.includes('reload refused')), 5_000, 'the refusal');
      assert.equal(refused, `error [config] reload refused, still serving the previous config: ${file}: mcpServers.a.args: got number, expected an array of strings`);
      fs.writeFileSync(file, '{"mcpServers": {"a": ');
      await waitFor(() => lines.slice(countBefore).filter((l) => l.includes('reload refused')).length === 2, 5_000, 'the second refusal');
      assert.match(lines.filter((l) => l.includes('reload refused'))[1]!, /config\.json: not valid JSON( at line 1, column \d+)?$/);
      assert.deepEqual(Object.keys(h.proxy.status()).sort(), ['a', 'c']);
      assert.equal(h.proxy.status().a!.pid, aPid);
      assert.equal(sessionOf(a), aSession);
      assert.equal(textOf(await a.callTool({ name: 'x', arguments: { what: 'echo', text: 'still' } })), 'still');
      assert.deepEqual(lines.slice(countBefore).filter((l) => l.startsWith('error')).length, 2, lines.slice(countBefore).join('\n'));
      // Fixed: applied.
      fs.writeFileSync(file, json({ a: fx(), c: fx(), d: fx() }));
      await waitFor(() => h.proxy.status().d?.state === 'ready', 10_000, 'd once the file is valid again');
      assert.equal(h.proxy.status().a!.pid, aPid);
    });

    it('a rotated ${file:} secret restarts only the server that reads it; no value reaches the log', { timeout: 60_000 }, async (t) => {
      const dir = tmpDir('reload-secret');
      const secrets = tmpDir('reload-secret-dir'); // another directory: it is watched too
      const secret = path.join(secrets, 'api-key');
      fs.writeFileSync(secret, 'first-secret-value-0001\n');
      const file = path.join(dir, 'config.json');
      fs.writeFileSync(file, json({ uses: fx({ API_KEY: `\${file:${secret}}` }), other: fx() }));
      const lines: string[] = [];
      const h = await watched(t, file, lines);
      const uses = await h.client('uses', 'mcp');
      const other = await h.client('other', 'mcp');
      const before = h.proxy.status();
      assert.equal(JSON.parse(textOf(await uses.callTool({ name: 'x', arguments: { what: 'env' } }))).API_KEY, 'first-secret-value-0001');
      // Rotated the way Kubernetes and editors do: a new file renamed over the old one.
      fs.writeFileSync(`${secret}.new`, 'second-secret-value-0002\n');
      fs.renameSync(`${secret}.new`, secret);
      await waitFor(() => h.proxy.status().uses?.state === 'ready' && h.proxy.status().uses!.pid !== before.uses!.pid, 10_000, 'uses restarted');
      const again = await h.client('uses', 'mcp');
      assert.equal(JSON.parse(textOf(await again.callTool({ name: 'x', arguments: { what: 'env' } }))).API_KEY, 'second-secret-value-0002');
      assert.equal(h.proxy.status().other!.pid, before.other!.pid);
      assert.ok((await other.listTools()).tools.length >= 0);
      assert.ok(lines.some((l) => l.includes('restarted "uses" (env.API_KEY changed)')), lines.join('\n'));
      assert.ok(!lines.some((l) => /secret-value/.test(l)), 'a secret value reached the log');
      void uses;
    });

    it('reload(config) from code: a segment clash throws and changes nothing; settings read as used are updated in place, without a restart', { timeout: 30_000 }, async (t) => {
      const lines: string[] = [];
      const h = await harness(t, { servers: [fixture('one')] }, { log: captureLog(lines), limits: FAST });
      await h.proxy.ready(10_000);
      const pid = h.proxy.status().one!.pid;
      await assert.rejects(h.proxy.reload({ servers: [fixture('one'), fixture('Two'), fixture('two')] }), (err: ProxyError) => err.code === 'SEGMENT_CLASH');
      assert.deepEqual(Object.keys(h.proxy.status()), ['one']);
      const diff = await h.proxy.reload({ servers: [fixture('one', 'ok', { idleTimeoutMs: 60_000, listTtlMs: 0 })] });
      assert.deepEqual(diff!.updated.map((s) => s.name), ['one']);
      assert.equal(h.proxy.status().one!.pid, pid);
      assert.ok(lines.some((l) => l.includes('updated "one" in place')), lines.join('\n'));
      // An unchanged config is no reload at all.
      const same = await h.proxy.reload({ servers: [fixture('one', 'ok', { idleTimeoutMs: 60_000, listTtlMs: 0 })] });
      assert.deepEqual(same!.unchanged.map((s) => s.name), ['one']);
      assert.equal(lines.filter((l) => l.includes('reloaded')).length, 1);
    });

    describe('the hostile review of reload, finding by finding', () => {
      // R1. A request whose body was still being read when a reload removed its server started a child on the
      // removed runtime, which nothing ever stopped (not the sweep, not a graceful shutdown).
      it('R1 an initialize whose body arrives after a reload removed its per-session server → 404 "removed or restarted", and no child is started for it', { timeout: 30_000 }, async (t) => {
        const pidFile = path.join(tmpDir('r1'), 'pids');
        const ps = fixture('ps', 'ok', { sessions: 'per-session', env: { FIXTURE_PIDFILE: pidFile } });
        const h = await harness(t, { servers: [ps, fixture('other')] }, { limits: FAST });
        await h.proxy.ready(10_000);
        const body = JSON.stringify(initMsg());
        const socket = net.connect(h.proxy.port, '127.0.0.1');
        let answer = '';
        socket.on('data', (d: Buffer) => (answer += d.toString()));
        socket.write(`POST /ps/mcp HTTP/1.1\r\nHost: 127.0.0.1:${h.proxy.port}\r\nContent-Type: application/json\r\n` +
          `Accept: application/json, text/event-stream\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body.slice(0, 10)}`);
        // A round trip on another connection: the proxy has read this one's headers (sent first) by its end.
        assert.equal((await request(`${h.url}/healthz`)).status, 200);
        await h.proxy.reload({ servers: [fixture('other')] });
        socket.end(body.slice(10));
        await waitFor(() => answer.includes('\r\n\r\n{'), 5_000, 'the answer');
        assert.match(answer, /^HTTP\/1\.1 404 /);
        assert.match(answer, /this server was removed or restarted by a config reload; reconnect/);
        assert.deepEqual(fileLines(pidFile), [], 'a child was started for a removed server');
      });

      // R2, R3. Every event in the config's directory reloaded: a log written there made a reload (and its
      // warnings, or its refusal) every 250 ms for ever; a file rewritten there faster than that held reloads back.
      it('R2 R3 events for other files in the directory neither reload nor delay one; a refusal is logged once; a config rewritten in a loop still reloads within the max wait', { timeout: 40_000 }, async (t) => {
        const dir = tmpDir('r2');
        const file = path.join(dir, 'config.json');
        const fx = { command: NODE, args: ['-e', FIXTURE, 'ok'] };
        fs.writeFileSync(file, JSON.stringify({ mcpServers: { a: fx } }));
        const lines: string[] = [];
        const h = await harness(t, loadConfigFile(file).config!, { configPath: file, watchConfig: true, log: captureLog(lines), limits: FAST });
        await h.proxy.ready(10_000);
        let noiseWrites = 0;
        const noise = setInterval(() => (fs.appendFileSync(path.join(dir, 'proxy.log'), 'a log line\n'), noiseWrites++), 20);
        t.after(() => clearInterval(noise));
        // A remote entry: a warning each time the file is loaded; broken JSON: a refusal.
        fs.writeFileSync(file, JSON.stringify({ mcpServers: { a: fx, r: { url: 'https://x.example/mcp' } } }));
        await waitFor(() => lines.some((l) => l.includes('skipped: a remote server')), 5_000, 'the warning');
        fs.writeFileSync(file, '{"mcpServers": ');
        await waitFor(() => lines.some((l) => l.includes('reload refused')), 5_000, 'the refusal');
        const rewrite = setInterval(() => fs.writeFileSync(file, '{"mcpServers": '), 100);
        // The loop and the noise run on: the same refusal comes again (at debug), the log file keeps growing.
        const noiseBefore = noiseWrites;
        await waitFor(() => lines.filter((l) => l.startsWith('debug [config] reload refused')).length >= 1 && noiseWrites - noiseBefore >= 40, 10_000, 'repeats and noise');
        clearInterval(rewrite);
        assert.equal(lines.filter((l) => l.startsWith('warn [config]') && l.includes('skipped: a remote server')).length, 1, lines.join('\n'));
        assert.equal(lines.filter((l) => l.startsWith('error [config] reload refused')).length, 1, lines.join('\n'));
        // Rewritten every 100 ms, the config is still read within CONFIG_MAX_WAIT_MS (2 s) of the first write.
        const good = JSON.stringify({ mcpServers: { a: fx, b: fx } });
        const started = Date.now();
        const loop = setInterval(() => fs.writeFileSync(file, good), 100);
        t.after(() => clearInterval(loop));
        await waitFor(() => h.proxy.status().b, 5_000, 'b while the file is rewritten in a loop');
        assert.ok(Date.now() - started < 4_000, `took ${Date.now() - started} ms`);
        clearInterval(loop);
      });

      // R4, R5, R6. The watch died with a recreated directory; a secret file named only by a refused config was
      // never watched; a secret moved to another directory (same value) was not watched there.
      it('R4 R5 R6 a recreated config directory is watched again; a secret file a refused config waits for is watched; a secret moved to another directory is watched there', { timeout: 60_000 }, async (t) => {
        const root = tmpDir('r4');
        const conf = path.join(root, 'conf');
        fs.mkdirSync(conf);
        const file = path.join(conf, 'config.json');
        const fx = (env: Record<string, string> = {}) => ({ command: NODE, args: ['-e', FIXTURE, 'ok'], env });
        fs.writeFileSync(file, JSON.stringify({ mcpServers: { a: fx() } }));
        const lines: string[] = [];
        const h = await harness(t, loadConfigFile(file).config!, { configPath: file, watchConfig: true, log: captureLog(lines), limits: { ...FAST, sweepIntervalMs: 100 } });
        await h.proxy.ready(10_000);
        fs.rmSync(conf, { recursive: true });
        fs.mkdirSync(conf);
        fs.writeFileSync(file, JSON.stringify({ mcpServers: { a: fx(), b: fx() } }));
        await waitFor(() => h.proxy.status().b, 5_000, 'b after the directory was recreated');
        fs.writeFileSync(file, JSON.stringify({ mcpServers: { a: fx(), b: fx(), c: fx() } }));
        await waitFor(() => h.proxy.status().c, 5_000, 'c: a later edit in the new directory');
        // R5: d needs a secret that is not there yet: refused; the secret's arrival (elsewhere) fixes it.
        const later = path.join(tmpDir('r5'), 'token');
        fs.writeFileSync(file, JSON.stringify({ mcpServers: { a: fx(), d: fx({ TOKEN: `\${file:${later}}` }) } }));
        await waitFor(() => lines.some((l) => l.includes('reload refused') && l.includes('cannot read secret file')), 5_000, 'the refusal');
        fs.writeFileSync(later, 'token-value-0001\n');
        await waitFor(() => h.proxy.status().d, 5_000, 'd once its secret file was written');
        // R6: d's secret moves to another directory with the same value (nothing to restart), then rotates there.
        const moved = path.join(tmpDir('r6'), 'token');
        fs.writeFileSync(moved, 'token-value-0001\n');
        const dPid = h.proxy.status().d!.pid;
        fs.writeFileSync(file, JSON.stringify({ mcpServers: { a: fx(), d: fx({ TOKEN: `\${file:${moved}}` }) } }));
        await waitFor(() => lines.some((l) => l === 'debug [config] reload: nothing changed'), 5_000, 'the empty reload');
        assert.equal(h.proxy.status().d!.pid, dPid);
        fs.writeFileSync(moved, 'token-value-0002\n');
        await waitFor(() => h.proxy.status().d?.pid !== dPid && h.proxy.status().d?.state === 'ready', 5_000, 'd restarted by the rotation in its new directory');
      });

      // R7. The root route (/mcp) followed "the only server": adding a second one took it from the clients using it.
      it('R7 the root route stays with its server when a reload adds another; when that server goes, it passes to the only one left, with a warning', { timeout: 30_000 }, async (t) => {
        const lines: string[] = [];
        const h = await harness(t, { servers: [fixture('keep')] }, { log: captureLog(lines), limits: FAST });
        await h.proxy.ready(10_000);
        const rootSession = async () => {
          const res = await post(`${h.url}/mcp`, initMsg(), { accept: 'application/json' });
          assert.equal(res.status, 200, res.text);
          return String(res.headers['mcp-session-id']);
        };
        const sid = await rootSession();
        const pid = async () => answerText(await post(`${h.url}/mcp`, call(1, { what: 'pid' }), sessionHeaders(sid)));
        const keepPid = await pid();
        await h.proxy.reload({ servers: [fixture('keep'), fixture('other')] });
        assert.equal(await pid(), keepPid, 'the same session at /mcp, on the same child');
        await waitFor(() => h.proxy.status().other?.state === 'ready', 10_000, 'other');
        await h.proxy.reload({ servers: [fixture('other')] });
        assert.ok(lines.includes('warn [config] the root route (/mcp, /sse) served "keep", which is gone: it serves "other" now'), lines.join('\n'));
        const fresh = await rootSession();
        assert.equal(answerText(await post(`${h.url}/mcp`, call(2, { what: 'pid' }), sessionHeaders(fresh))), String(h.proxy.status().other!.pid));
      });

      // R9. A per-session child was stopped (and logged) twice when its server was removed.
      it('R9 a removed per-session server\'s child is stopped once: one "stopped" line per child', { timeout: 30_000 }, async (t) => {
        const lines: string[] = [];
        const h = await harness(t, { servers: [fixture('ps', 'ok', { sessions: 'per-session' })] }, { log: captureLog(lines), limits: FAST });
        await rawSession(h.url, 'ps');
        await rawSession(h.url, 'ps');
        await h.proxy.reload({ servers: [] });
        const stopped = lines.filter((l) => /^info \[ps\] pid \d+ stopped \(removed from the config\)$/.test(l));
        assert.equal(stopped.length, 2, lines.join('\n'));
        assert.equal(new Set(stopped).size, 2);
      });

      // R10 (found by reading: the proxy-wide mask list kept only the last reload's secrets). What a stopping child
      // prints is masked with its own config's secrets first, so this test holds with or without the retiring list
      // (checked: it passes with that fix reverted); it pins the behaviour users see, not that fix.
      it('R10 a child that prints its old secret while it stops after a rotation: the old value is masked in the log', { timeout: 30_000 }, async (t) => {
        const dir = tmpDir('r10');
        const secret = path.join(dir, 'key');
        fs.writeFileSync(secret, 'old-secret-value-r10-0001\n');
        const file = path.join(dir, 'config.json');
        // It says its key on stderr when its input ends, then exits.
        const child = `process.stdin.on('end', () => { process.stderr.write('my key was ' + process.env.KEY + '\\n'); setTimeout(() => process.exit(0), 20); });` + FIXTURE.replace("process.stdin.on('end', () => {", "process.stdin.on('end', () => { return;");
        const entry = { command: NODE, args: ['-e', child, 'ok'], env: { KEY: `\${file:${secret}}` } };
        fs.writeFileSync(file, JSON.stringify({ mcpServers: { s: entry } }));
        const lines: string[] = [];
        const h = await harness(t, loadConfigFile(file).config!, { configPath: file, log: captureLog(lines), limits: FAST });
        await h.proxy.ready(10_000);
        fs.writeFileSync(secret, 'new-secret-value-r10-0002\n');
        await h.proxy.reload();
        const said = await waitFor(() => lines.find((l) => l.includes('my key was')), 5_000, 'the old child\'s last words');
        assert.match(said, /my key was \*\*\*/);
        assert.ok(!lines.join('\n').includes('old-secret-value-r10'), 'the old secret reached the log');
      });

      // Design gap: a changed server's new child started while the old one was still stopping (two writers).
      it('a changed server\'s new child starts only after the old one has exited', { timeout: 30_000 }, async (t) => {
        const log = path.join(tmpDir('overlap'), 'log');
        // The child logs its start and its exit; it takes 100 ms to exit after its input ends (killGraceMs is 200).
        const slowExit = `require('fs').appendFileSync(${JSON.stringify(log)},'start '+Date.now()+'\\n');` +
          `process.stdin.on('end',()=>setTimeout(()=>{require('fs').appendFileSync(${JSON.stringify(log)},'exit '+Date.now()+'\\n');process.exit(0)},100));`;
        const server = (level: string) => srv('db', ['-e', slowExit + FIXTURE.replace("process.stdin.on('end', () => {", "process.stdin.on('end', () => { return;"), 'ok'], { env: { LEVEL: level } });
        const h = await harness(t, { servers: [server('1')] }, { limits: FAST });
        await h.proxy.ready(10_000);
        await h.proxy.reload({ servers: [server('2')] });
        await waitFor(() => h.proxy.status().db?.state === 'ready', 10_000, 'the new child');
        const events = fileLines(log).map((l) => l.split(' ')).map(([what, at]) => ({ what, at: Number(at) }));
        assert.deepEqual(events.map((e) => e.what), ['start', 'exit', 'start'], fileLines(log).join('\n'));
        assert.ok(events[2]!.at >= events[1]!.at, 'the new child started before the old one exited');
      });
    });
  });

  it('startProxy() listens on an ephemeral port and ready() waits for initialize', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    assert.ok(h.proxy.port > 0);
    assert.equal(h.proxy.url, `http://127.0.0.1:${h.proxy.port}`);
    await h.proxy.ready(10_000);
    assert.equal(h.proxy.status().fix!.state, 'ready');
  });

  it('ready(timeoutMs) rejects while a child has not answered initialize; /readyz → 503 naming its state', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('slow', 'noinit'), fixture('fast')] }, {
      limits: { ...FAST, initTimeoutMs: 60_000, retryAfterS: 11 },
    });
    await assert.rejects(h.proxy.ready(300), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'NOT_READY');
      assert.match(err.message, /^servers not ready: .*slow \(starting\)/);
      return true;
    });
    assert.equal(h.proxy.status().slow!.state, 'starting');
    const res = await request(`${h.url}/readyz`);
    assert.equal(res.status, 503);
    const body = JSON.parse(res.text);
    assert.equal(body.servers.slow.state, 'starting');
    // A server still starting is not ready (unlike one that gave up); each answers for itself.
    await waitFor(() => h.proxy.status().fast!.state === 'ready', 10_000, 'fast ready');
    assert.equal((await request(`${h.url}/readyz?server=slow`)).status, 503);
    assert.equal((await request(`${h.url}/readyz?server=fast`)).status, 200);
    assert.equal((await request(`${h.url}/healthz`)).status, 200, 'healthz stays 200');
    const init = await post(`${h.url}/slow/mcp`, initMsg(), { accept: 'application/json' });
    assertRpcError(init, 503, -32000);
    assert.equal(init.headers['retry-after'], '11', 'with Retry-After');
  });

  it('per-server "startTimeoutMs" overrides initTimeoutMs for that server only', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('slow', 'noinit', { startTimeoutMs: 1_000 }), fixture('patient', 'noinit')] }, {
      limits: { ...FAST, initTimeoutMs: 60_000, maxUnstableRestarts: 100 },
    });
    await waitFor(() => h.proxy.status().slow!.restarts >= 1, 10_000, 'slow restarted after its own 1 s start timeout');
    assert.equal(h.proxy.status().patient!.restarts, 0, 'the other server still waits for initTimeoutMs');
  });

  it('per-server "idleTimeoutMs": an idle session of that server ends (404), another server\'s idle session stays', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('brief', 'ok', { idleTimeoutMs: 1_000 }), fixture('lasting')] }, {
      limits: { ...FAST, sweepIntervalMs: 100 },
    });
    await h.proxy.ready(10_000);
    const brief = await rawSession(h.url, 'brief');
    const lasting = await rawSession(h.url, 'lasting');
    // Watched through status(): a request would itself be activity.
    await waitFor(() => h.proxy.status().brief!.sessions === 0, 10_000, 'the brief session to expire');
    assert.equal(h.proxy.status().lasting!.sessions, 1);
    assert.equal((await post(`${h.url}/brief/mcp`, { jsonrpc: '2.0', id: 1, method: 'ping' }, sessionHeaders(brief))).status, 404);
    assert.equal((await post(`${h.url}/lasting/mcp`, { jsonrpc: '2.0', id: 1, method: 'ping' }, sessionHeaders(lasting))).status, 200);
  });

  it('initTimeoutMs: a child that never answers initialize is killed and restarted', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('slow', 'noinit')] }, { limits: { ...FAST, initTimeoutMs: 200, maxUnstableRestarts: 100 } });
    const first = await waitFor(() => h.proxy.status().slow!.pid, 5_000, 'first pid');
    await waitFor(() => h.proxy.status().slow!.restarts >= 1, 10_000, 'restart after init timeout');
    await waitFor(() => liveGroupMembers(first).length === 0, GONE_BOUND_MS, 'timed-out child group gone');
  });

  it('a child killed mid-request: the client gets an error promptly, and the restarted child serves the next call', { timeout: 60_000 }, async (t) => {
    const h = await harness(t, { servers: [everything()] }, { limits: { ...FAST, requestTimeoutMs: 120_000 } });
    await h.proxy.ready(20_000);
    const client = await h.client('everything', 'mcp');
    const oldPid = h.proxy.status().everything!.pid!;
    let progressed = 0;
    const longCall = client.callTool({ name: 'trigger-long-running-operation', arguments: { duration: 60, steps: 60 } }, undefined, {
      onprogress: () => progressed++,
      timeout: 120_000,
    });
    const outcome = longCall.then(() => 'resolved', (e: unknown) => e);
    await waitFor(() => progressed > 0, 10_000, 'first progress (request is in the child)');
    process.kill(-oldPid, 'SIGKILL');
    const result = await within(outcome, 10_000, 'in-flight call after the child died');
    isMcpError(-32005, 'MCP server process exited')(result);
    await waitFor(() => {
      const s = h.proxy.status().everything!;
      return s.state === 'ready' && s.pid !== oldPid && s.restarts >= 1;
    }, 15_000, 'restarted child ready');
    const fresh = await h.client('everything', 'mcp');
    assert.equal(textOf(await fresh.callTool({ name: 'echo', arguments: { message: 'after restart' } })), 'Echo: after restart');
  });

  it('a server named as real configs name them ("MCP SQLite Server") is served at its derived segment, matched case-insensitively; when it gives up, the log quotes its stderr lines but not npm\'s "A complete log" pointer', { timeout: 30_000 }, async (t) => {
    const lines: string[] = [];
    const crash = "process.stderr.write('Error: Cannot find module better-sqlite3\\nnpm error A complete log of this run can be found in: /root/.npm/_logs/x.log\\n'); setTimeout(() => process.exit(1), 20)";
    const h = await harness(t, { servers: [fixture('MCP SQLite Server'), srv('Broken Thing', ['-e', crash])] }, {
      log: captureLog(lines), limits: { ...FAST, restartMinDelayMs: 20, restartMaxDelayMs: 40, maxUnstableRestarts: 2 },
    });
    await waitFor(() => h.proxy.status()['MCP SQLite Server']?.state === 'ready', 10_000, 'the server ready (status is keyed by name)');
    for (const path of ['/mcp-sqlite-server/mcp', '/MCP-SQLite-Server/mcp']) {
      const init = await post(`${h.url}${path}`, initMsg(), { accept: 'application/json' });
      assert.equal(init.status, 200, `${path}: ${init.text}`);
    }
    assert.equal((await post(`${h.url}/MCP%20SQLite%20Server/mcp`, initMsg(), { accept: 'application/json' })).status, 404);
    await waitFor(() => h.proxy.status()['Broken Thing']?.state === 'errored', 15_000, 'the broken server errored');
    assert.equal((await request(`${h.url}/readyz?server=broken-thing`)).status, 503);
    assert.deepEqual(JSON.parse((await request(`${h.url}/readyz`)).text).errored, ['Broken Thing']);
    const gaveUp = lines.find((l) => l.startsWith('error [Broken Thing]') && l.includes('gave up'));
    assert.ok(gaveUp, lines.join('\n'));
    assert.match(gaveUp!, /Cannot find module better-sqlite3/);
    assert.doesNotMatch(gaveUp!, /A complete log/);
  });

  it('when every server has given up, /readyz is 503: the instance serves nothing', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('c1', 'crash'), fixture('c2', 'crash')] }, {
      limits: { ...FAST, restartMinDelayMs: 20, restartMaxDelayMs: 80, maxUnstableRestarts: 2 },
    });
    await waitFor(() => h.proxy.status().c1!.state === 'errored' && h.proxy.status().c2!.state === 'errored', 15_000, 'both errored');
    const ready = await request(`${h.url}/readyz`);
    assert.equal(ready.status, 503, ready.text);
    assert.deepEqual(JSON.parse(ready.text).errored, ['c1', 'c2']);
  });

  it('a server that always crashes becomes errored: its endpoints → 503, others keep working; /readyz stays 200 and names it, /readyz?server=crashy → 503', { timeout: 30_000 }, async (t) => {
    const h = await harness(
      t,
      { servers: [fixture('crashy', 'crash'), fixture('fine'), fixture('fine2')] },
      { limits: { ...FAST, restartMinDelayMs: 20, restartMaxDelayMs: 80, maxUnstableRestarts: 3, retryAfterS: 9 } },
    );
    await waitFor(() => h.proxy.status().crashy!.state === 'errored', 15_000, 'crashy errored');
    assert.ok(h.proxy.status().crashy!.restarts >= 3, `restarts ${h.proxy.status().crashy!.restarts}`);
    await waitFor(() => h.proxy.status().fine!.state === 'ready', 10_000, 'fine ready');
    const init = await post(`${h.url}/crashy/mcp`, initMsg(), { accept: 'application/json' });
    assert.equal(assertRpcError(init, 503, -32000).error.message, 'MCP server failed and is not running');
    // No Retry-After assertion here: errored needs the operator, so proxy.ts omits it (see the 'starting' test).
    const sse = await request(`${h.url}/crashy/sse`, { headers: { accept: 'text/event-stream' } });
    assertRpcError(sse, 503, -32000);
    await waitFor(() => h.proxy.status().fine2!.state === 'ready', 10_000, 'fine2 ready');
    // One broken server does not take the healthy ones out of a load balancer: reported, not fatal.
    const ready = await request(`${h.url}/readyz`);
    assert.equal(ready.status, 200, ready.text);
    const body = JSON.parse(ready.text);
    assert.equal(body.servers.crashy.state, 'errored');
    assert.deepEqual(body.errored, ['crashy']);
    assert.equal(body.ready, true);
    const one = await request(`${h.url}/readyz?server=crashy`);
    assert.equal(one.status, 503, one.text);
    assert.deepEqual(JSON.parse(one.text), { ready: false, state: 'errored' });
    assert.equal((await request(`${h.url}/readyz?server=fine`)).status, 200);
    assert.deepEqual(JSON.parse((await request(`${h.url}/readyz?server=nosuch`)).text), { ready: false });
    assert.equal((await request(`${h.url}/readyz?server=nosuch`)).status, 503);
    assert.equal((await request(`${h.url}/healthz`)).status, 200);
    const client = await h.client('fine', 'mcp');
    assert.equal(textOf(await client.callTool({ name: 'do', arguments: { what: 'echo', text: 'unaffected' } })), 'unaffected');
  });

  it('while a shared child waits to restart, new and existing sessions get 503 with Retry-After; close() does not wait for the timer', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: { ...FAST, restartMinDelayMs: 60_000, restartMaxDelayMs: 60_000, retryAfterS: 4 } });
    await h.proxy.ready(10_000);
    const sid = await rawSession(h.url, 'fix');
    const pid = h.proxy.status().fix!.pid!;
    process.kill(-pid, 'SIGKILL');
    await waitFor(() => h.proxy.status().fix!.state === 'restarting', 5_000, 'restarting');
    const fresh = await post(`${h.url}/fix/mcp`, initMsg(), { accept: 'application/json' });
    assertRpcError(fresh, 503, -32000);
    assert.equal(fresh.headers['retry-after'], '4');
    const existing = await post(`${h.url}/fix/mcp`, ping(1), sessionHeaders(sid));
    assertRpcError(existing, 503, -32000);
    assert.equal(existing.headers['retry-after'], '4');
    await within(h.proxy.close(), 10_000, 'close() during a 60 s restart delay');
  });

  it('a command that does not exist ends up errored without taking the proxy down', { timeout: 30_000 }, async (t) => {
    const h = await harness(
      t,
      { servers: [srv('ghost', [], { command: '/nonexistent/definitely-not-here' }), fixture('fine')] },
      { limits: { ...FAST, restartMinDelayMs: 20, restartMaxDelayMs: 40, maxUnstableRestarts: 2 } },
    );
    await waitFor(() => h.proxy.status().ghost!.state === 'errored', 15_000, 'ghost errored');
    await waitFor(() => h.proxy.status().fine!.state === 'ready', 10_000, 'fine ready');
    assertRpcError(await post(`${h.url}/ghost/mcp`, initMsg(), { accept: 'application/json' }), 503, -32000);
    const client = await h.client('fine', 'sse');
    assert.equal(textOf(await client.callTool({ name: 'do', arguments: { what: 'echo', text: 'up' } })), 'up');
  });

  it('a child exiting on its own is restarted and restarts is counted', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const client = await h.client('fix', 'mcp');
    const pid1 = h.proxy.status().fix!.pid;
    await assert.rejects(within(client.callTool({ name: 'do', arguments: { what: 'die' } }), 10_000, 'call to a dying child'), isMcpError(-32005, 'MCP server process exited'));
    await waitFor(() => h.proxy.status().fix!.state === 'ready' && h.proxy.status().fix!.pid !== pid1, 10_000, 'restart');
    assert.equal(h.proxy.status().fix!.restarts, 1);
  });

  it('close() is idempotent, stops every child and the listener', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('a'), fixture('b')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    h.sample();
    await Promise.all([h.proxy.close(), h.proxy.close()]);
    await h.proxy.close();
    for (const s of Object.values(h.proxy.status())) assert.equal(s.state, 'stopped');
    await assert.rejects(request(`${h.url}/healthz`), (e: NodeJS.ErrnoException) => e.code === 'ECONNREFUSED');
    await assertAllGone(h.groups);
  });

  it('close() while children are still starting leaves nothing behind', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [everything('e1'), everything('e2'), fixture('slow', 'noinit')] }, { limits: FAST });
    await waitFor(() => Object.values(h.proxy.status()).some((s) => s.pid !== null), 5_000, 'a child spawned');
    h.sample();
    await h.proxy.close();
  });

  it('close() with open SSE and Streamable HTTP streams and a request in flight finishes', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const sse = await openSse(`${h.url}/fix/sse`);
    await sse.next((e) => e.event === 'endpoint', 5_000, 'endpoint');
    const sid = await rawSession(h.url, 'fix');
    const get = await openSse(`${h.url}/fix/mcp`, { 'mcp-session-id': sid });
    const hanging = post(`${h.url}/fix/mcp`, call(1, { what: 'hang' }), sessionHeaders(sid));
    await waitFor(async () => JSON.parse(textOf(onlyMessage(await post(`${h.url}/fix/mcp`, call(2, { what: 'seen' }), sessionHeaders(sid))).result)).hung.length === 1, 5_000, 'the request at the child');
    await within(h.proxy.close(), 10_000, 'close() with open streams');
    await waitFor(() => sse.ended && get.ended, 5_000, 'streams ended by close()');
    // Shutdown ends every session first, so the waiting POST is answered (not dropped) with SESSION_ENDED.
    const res = await within(hanging, 5_000, 'in-flight POST after close');
    assert.equal(res.status, 200);
    assert.deepEqual(onlyMessage(res), { jsonrpc: '2.0', id: 1, error: { code: -32004, message: 'Session ended' } });
  });

  it('close() kills grandchildren left in the child process group', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const client = await h.client('fix', 'mcp');
    const gpid = Number(textOf(await client.callTool({ name: 'do', arguments: { what: 'grandchild' } })));
    h.extraPids.add(gpid);
    assert.ok(pidAlive(gpid), 'grandchild running');
    // t.after → Harness.stop(): close(), then the whole group, grandchild included, must be gone.
  });

  it('close() kills a grandchild that ignores SIGTERM (escalates to SIGKILL for the group)', { timeout: 20_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const client = await h.client('fix', 'mcp');
    const gpid = Number(textOf(await client.callTool({ name: 'do', arguments: { what: 'grandchild', ignoreTerm: true } })));
    h.extraPids.add(gpid);
    assert.ok(pidAlive(gpid), 'grandchild running');
  });

  it('a crashed child does not leave its grandchildren behind after restart', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const client = await h.client('fix', 'mcp');
    const pid1 = h.proxy.status().fix!.pid!;
    const gpid = Number(textOf(await client.callTool({ name: 'do', arguments: { what: 'grandchild' } })));
    h.extraPids.add(gpid);
    await client.callTool({ name: 'do', arguments: { what: 'die' } }).catch(() => null);
    await waitFor(() => h.proxy.status().fix!.state === 'ready' && h.proxy.status().fix!.pid !== pid1, 10_000, 'restart');
    await waitFor(() => !pidAlive(gpid), GONE_BOUND_MS, 'grandchild of the dead child reaped by group kill');
  });

  // Regression: a crashed child's group got one SIGTERM and was forgotten; a grandchild ignoring it leaked
  // on every crash (three in nine seconds, reparented to PID 1) and survived shutdown. Both tests below were
  // verified red on 19d7923, which sends that one SIGTERM: the grandchildren outlive the bound.
  it('a crashed child\'s group is reaped with SIGKILL after killGraceMs: a grandchild ignoring SIGTERM does not outlive its crash', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('fix')] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const client = await h.client('fix', 'mcp');
    const pid1 = h.proxy.status().fix!.pid!;
    const gpid = Number(textOf(await client.callTool({ name: 'do', arguments: { what: 'grandchild', ignoreTerm: true } })));
    h.extraPids.add(gpid);
    await client.callTool({ name: 'do', arguments: { what: 'die' } }).catch(() => null);
    await waitFor(() => h.proxy.status().fix!.state === 'ready' && h.proxy.status().fix!.pid !== pid1, 10_000, 'restart');
    await waitFor(() => !pidAlive(gpid), GONE_BOUND_MS, 'the SIGTERM-ignoring grandchild of the crashed child killed');
    assert.deepEqual(liveGroupMembers(pid1), []);
  });

  it('a child that crashes on every start, each time leaving a grandchild that ignores SIGTERM, leaves none behind', { timeout: 40_000 }, async (t) => {
    const gpidFile = path.join(tmpDir('gcrash'), 'gpids');
    const h = await harness(t, { servers: [fixture('crashy', 'gcrash', { env: { FIXTURE_GPIDFILE: gpidFile } })] }, {
      limits: { ...FAST, restartMinDelayMs: 50, restartMaxDelayMs: 50, maxUnstableRestarts: 100 },
    });
    t.after(() => {
      for (const line of fileLines(gpidFile)) h.extraPids.add(Number(line));
    });
    await waitFor(() => fileLines(gpidFile).length >= 3, 15_000, 'three crashes');
    const [g1, g2] = fileLines(gpidFile).map(Number);
    await waitFor(() => !pidAlive(g1!) && !pidAlive(g2!), GONE_BOUND_MS, 'the grandchildren of the first two crashes killed');
  });

  // Regression: limits of 0 or NaN were accepted.
  it('startProxy() rejects a limit that is not a positive integer (INVALID_LIMIT, "limits.NAME: got X, expected a positive integer")', { timeout: 20_000 }, async () => {
    for (const [name, value] of [['maxBodyBytes', 0], ['maxBodyBytes', -1], ['requestTimeoutMs', 1.5], ['maxJsonDepth', NaN], ['maxConnections', Infinity]] as const) {
      const outcome = await startProxy({ servers: [] }, { host: '127.0.0.1', port: 0, logLevel: 'error', limits: { [name]: value } }).then(
        async (proxy) => {
          await proxy.close();
          return 'started';
        },
        (err: unknown) => err,
      );
      assert.notEqual(outcome, 'started', `limits.${name} = ${value} accepted`);
      const err = outcome as Error & { code?: string };
      assert.equal(err.code, 'INVALID_LIMIT');
      assert.equal(err.message, `limits.${name}: got ${String(value)}, expected a positive integer`);
    }
  });

  // Regression: --token a and --token "" were accepted.
  it('startProxy() refuses tokens under 16 characters (WEAK_TOKEN), "" included; 16 is enough', { timeout: 20_000 }, async () => {
    for (const tokens of [['a'], [''], ['x'.repeat(15)], ['strong-token-0123456789', 'short']]) {
      for (const host of ['127.0.0.1', '0.0.0.0']) {
        const outcome = await startProxy({ servers: [] }, { host, port: 0, logLevel: 'error', tokens }).then(
          async (proxy) => {
            await proxy.close();
            return 'started';
          },
          (err: unknown) => err,
        );
        assert.notEqual(outcome, 'started', `${JSON.stringify(tokens)} on ${host} accepted`);
        assert.equal((outcome as { code?: string }).code, 'WEAK_TOKEN');
        assert.ok(!String((outcome as Error).message).includes('x'.repeat(15)), 'the token is not quoted');
      }
    }
    const ok = await startProxy({ servers: [] }, { host: '127.0.0.1', port: 0, logLevel: 'error', tokens: ['y'.repeat(16)] });
    await ok.close();
  });

  // F11. Timer limits past 2^31 - 1 ms became 1 ms; limits that contradict each other were accepted or hit Node's ERR_OUT_OF_RANGE.
  it('F11 startProxy() refuses with INVALID_LIMIT: a timer limit over 2147483647 ms, maxBodyBytes > maxBodyBytesInFlight, headersTimeoutMs > httpRequestTimeoutMs; at the bounds it starts', { timeout: 20_000 }, async () => {
    const outcome = (limits: Record<string, number>) => startProxy({ servers: [] }, { host: '127.0.0.1', port: 0, logLevel: 'error', limits }).then(
      async (proxy) => {
        await proxy.close();
        return 'started' as const;
      },
      (err: unknown) => err as ProxyError,
    );
    const cases: [Record<string, number>, string][] = [
      [{ sseKeepaliveMs: 2 ** 31 }, 'limits.sseKeepaliveMs: got 2147483648, expected at most 2147483647 ms'],
      [{ killGraceMs: 2 ** 40 }, 'limits.killGraceMs: got 1099511627776, expected at most 2147483647 ms'],
      [{ maxBodyBytes: 32 * MIB }, 'limits.maxBodyBytes (33554432) is larger than limits.maxBodyBytesInFlight (16777216): such a body could never be read'],
      [{ headersTimeoutMs: 120_000 }, 'limits.headersTimeoutMs (120000) is longer than limits.httpRequestTimeoutMs (60000)'],
    ];
    for (const [limits, message] of cases) {
      const err = await outcome(limits);
      assert.notEqual(err, 'started', `${JSON.stringify(limits)} accepted`);
      assert.ok(err instanceof ProxyError, `${JSON.stringify(limits)}: ${String(err)} (${(err as { code?: string }).code})`);
      assert.equal(err.code, 'INVALID_LIMIT');
      assert.equal(err.message, message);
    }
    const atBounds: Record<string, number>[] = [{ sseKeepaliveMs: 2 ** 31 - 1, killGraceMs: 2 ** 31 - 1 }, { maxBodyBytes: 16 * MIB }, { headersTimeoutMs: 60_000 }];
    for (const limits of atBounds) {
      assert.equal(await outcome(limits), 'started', JSON.stringify(limits));
    }
  });

  it('startProxy() with tlsCert/tlsKey serves HTTPS; a pair replaced by rename reaches new connections while the open session keeps its connection; a bad new pair is logged once and the previous one keeps serving', { timeout: 40_000 }, async (t) => {
    // Verified red, each on a broken copy of proxy.ts: without setSecureContext the wait for cert B times out;
    // with closeAllConnections() after it, the "same connection" check fails; watching the two files instead of
    // their directory, the first rename is seen and the second never is (the wait for the bad pair times out).
    const dir = tmpDir('tls');
    const certFile = path.join(dir, 'cert.pem');
    const keyFile = path.join(dir, 'key.pem');
    const [a, b, c] = [selfSignedCert('cert A'), selfSignedCert('cert B'), selfSignedCert('cert C')];
    fs.writeFileSync(certFile, a.cert);
    fs.writeFileSync(keyFile, a.key);
    const lines: string[] = [];
    // keepAliveTimeoutMs is long so that the open connection is still there after the reload.
    const h = await harness(t, { servers: [fixture('fix')] }, { tlsCert: certFile, tlsKey: keyFile, log: captureLog(lines), limits: { ...FAST, keepAliveTimeoutMs: 60_000 } });
    assert.equal(h.proxy.url, `https://127.0.0.1:${h.proxy.port}`);
    await h.proxy.ready(10_000);
    const ca = [a.cert, b.cert, c.cert];
    assert.equal(await newConnectionFingerprint(h.proxy.port, ca), a.fingerprint);
    // The SDK client over node:https. Two sockets: its GET stream holds one, its POSTs reuse the other. No TLS
    // session resumption, so that every connection shows its peer certificate (a resumed one may not).
    const agent = new https.Agent({ keepAlive: true, maxSockets: 2, maxCachedSessions: 0, ca });
    const sockets: { method: string; socket: tls.TLSSocket }[] = [];
    const client = new Client({ name: 'tls-test', version: '1.0.0' });
    const transport = new StreamableHTTPClientTransport(new URL(`${h.url}/fix/mcp`), { fetch: httpsFetch(agent, sockets) });
    onCleanup(t, async () => {
      await client.close();
      agent.destroy();
    });
    await client.connect(transport);
    const echo = async (text: string) => textOf(await client.callTool({ name: 'do', arguments: { what: 'echo', text } }));
    assert.equal(await echo('before'), 'before');
    const lastPost = () => sockets.filter((s) => s.method === 'POST').at(-1)!.socket;
    const open = lastPost();
    const sid = transport.sessionId;
    assert.equal(open.getPeerCertificate().fingerprint256, a.fingerprint);

    replaceByRename(certFile, b.cert);
    replaceByRename(keyFile, b.key);
    await waitFor(async () => (await newConnectionFingerprint(h.proxy.port, ca)) === b.fingerprint, 10_000, 'a new connection to present cert B');
    assert.ok(lines.some((l) => /^info \[proxy\] TLS certificate reloaded from .*cert\.pem \(valid until /.test(l)), lines.join('\n'));
    assert.equal(await echo('after'), 'after');
    assert.equal(transport.sessionId, sid);
    assert.equal(lastPost(), open, 'the call after the reload went over the connection opened before it');
    assert.equal(open.getPeerCertificate().fingerprint256, a.fingerprint, 'an open connection keeps the certificate it was made with');

    replaceByRename(keyFile, c.key); // cert B with key C: no pair
    await waitFor(() => lines.some((l) => l.includes('TLS not reloaded')), 10_000, 'the bad pair logged');
    const bad = lines.filter((l) => l.includes('TLS not reloaded'));
    assert.equal(bad.length, 1, bad.join('\n'));
    assert.match(bad[0], /^error \[proxy\] TLS not reloaded, the previous certificate keeps serving: --tls-key ".*key\.pem": does not match the certificate in ".*cert\.pem"$/);
    for (const pem of [a.key, b.key, c.key]) assert.ok(!lines.join('\n').includes(pem.split('\n')[1]), 'no key material in the log');
    assert.equal(await newConnectionFingerprint(h.proxy.port, ca), b.fingerprint, 'new connections still get cert B');
    assert.equal(await echo('still'), 'still');
  });

  // L1, L2 (hostile review). A failed certificate reload was never tried again (a deploy hook that fixes the key acts
  // in archive/, which is not watched), and was logged again at every event in the directory.
  it('L1 L2 TLS: a failed reload is logged once however many events follow, and retried by the clock: a key made right in archive/ (not watched) is picked up', { timeout: 30_000 }, async (t) => {
    const dir = tmpDir('tls-retry');
    const archive = path.join(dir, 'archive');
    const live = path.join(dir, 'live');
    fs.mkdirSync(archive);
    fs.mkdirSync(live);
    const [a, b, c] = [selfSignedCert('a'), selfSignedCert('b'), selfSignedCert('c')];
    fs.writeFileSync(path.join(archive, 'cert1.pem'), a.cert);
    fs.writeFileSync(path.join(archive, 'key1.pem'), a.key);
    fs.symlinkSync('../archive/cert1.pem', path.join(live, 'cert.pem'));
    fs.symlinkSync('../archive/key1.pem', path.join(live, 'key.pem'));
    const lines: string[] = [];
    const proxy = await startProxy({ servers: [] }, {
      host: '127.0.0.1', port: 0, tlsCert: path.join(live, 'cert.pem'), tlsKey: path.join(live, 'key.pem'), log: captureLog(lines), limits: { tlsRetryMs: 300 },
    });
    t.after(() => proxy.close());
    // A renewal whose key is wrong (as good as unreadable): cert B with key C.
    fs.writeFileSync(path.join(archive, 'cert2.pem'), b.cert);
    fs.writeFileSync(path.join(archive, 'key2.pem'), c.key);
    for (const [link, target] of [['cert.pem', 'cert2.pem'], ['key.pem', 'key2.pem']]) {
      fs.unlinkSync(path.join(live, link));
      fs.symlinkSync(`../archive/${target}`, path.join(live, link));
    }
    await waitFor(() => lines.some((l) => l.startsWith('error [proxy] TLS not reloaded')), 5_000, 'the failure');
    fs.writeFileSync(path.join(live, 'README'), 'an unrelated file in the watched directory\n');
    await waitFor(() => lines.filter((l) => l.startsWith('debug [proxy] TLS not reloaded')).length >= 2, 5_000, 'the retries, at debug');
    // The deploy hook's fix, in archive/ only.
    fs.writeFileSync(path.join(archive, 'key2.pem'), b.key);
    await waitFor(async () => (await newConnectionFingerprint(proxy.port, [a.cert, b.cert])) === b.fingerprint, 5_000, 'cert B on new connections');
    assert.equal(lines.filter((l) => l.startsWith('error [proxy] TLS not reloaded')).length, 1, lines.join('\n'));
  });

  it('startProxy() with TLS: live/ symlinks re-pointed as certbot renews (unlink, symlink) are picked up; one watcher for one directory, closed by close()', { timeout: 30_000 }, async (t) => {
    const dir = tmpDir('tls');
    fs.mkdirSync(path.join(dir, 'archive'));
    fs.mkdirSync(path.join(dir, 'live'));
    const certs = [selfSignedCert('renewal 1'), selfSignedCert('renewal 2')];
    certs.forEach((c, i) => {
      fs.writeFileSync(path.join(dir, 'archive', `fullchain${i + 1}.pem`), c.cert);
      fs.writeFileSync(path.join(dir, 'archive', `privkey${i + 1}.pem`), c.key);
    });
    const link = (name: string, version: number) => fs.symlinkSync(`../archive/${name}${version}.pem`, path.join(dir, 'live', `${name}.pem`));
    link('fullchain', 1);
    link('privkey', 1);
    const watchesBefore = fsWatchHandles();
    const proxy = await startProxy({ servers: [] }, {
      host: '127.0.0.1', port: 0, logLevel: 'error',
      tlsCert: path.join(dir, 'live', 'fullchain.pem'), tlsKey: path.join(dir, 'live', 'privkey.pem'),
    });
    onCleanup(t, () => proxy.close());
    assert.equal(fsWatchHandles(), watchesBefore + 1, 'one watcher: both files are in live/');
    const ca = certs.map((c) => c.cert);
    assert.equal(await newConnectionFingerprint(proxy.port, ca), certs[0].fingerprint);
    for (const name of ['fullchain', 'privkey']) {
      fs.unlinkSync(path.join(dir, 'live', `${name}.pem`));
      link(name, 2);
    }
    await waitFor(async () => (await newConnectionFingerprint(proxy.port, ca)) === certs[1].fingerprint, 10_000, 'a new connection to present the renewed certificate');
    await proxy.close();
    // Verified red: with proxy.stopTlsWatch?.() removed from closeProxy, this times out at one watcher left.
    await waitFor(() => fsWatchHandles() === watchesBefore, 2_000, 'the certificate watcher closed');
  });

  it('startProxy() refuses a TLS pair it cannot serve (TLS), naming the file and never its contents: one file alone, missing, not PEM, a key of another certificate, over MAX_PEM_FILE_BYTES', { timeout: 20_000 }, async () => {
    const dir = tmpDir('tls');
    const good = selfSignedCert('good');
    const other = selfSignedCert('other');
    const file = (name: string, content: string) => {
      fs.writeFileSync(path.join(dir, name), content);
      return path.join(dir, name);
    };
    const cert = file('cert.pem', good.cert);
    const key = file('key.pem', good.key);
    const pemMax = 256 * 1024; // MAX_PEM_FILE_BYTES
    const atMax = file('at-max.pem', good.cert.padEnd(pemMax, '\n'));
    const overMax = file('over-max.pem', good.cert.padEnd(pemMax + 1, '\n'));
    const cases: [Partial<Record<'tlsCert' | 'tlsKey', string>>, RegExp][] = [
      [{ tlsCert: cert }, /^TLS needs both --tls-cert and --tls-key/],
      [{ tlsKey: key }, /^TLS needs both --tls-cert and --tls-key/],
      [{ tlsCert: path.join(dir, 'absent.pem'), tlsKey: key }, /^--tls-cert ".*absent\.pem": cannot read \(ENOENT\)$/],
      [{ tlsCert: file('garbage.pem', 'not a certificate\n'), tlsKey: key }, /^--tls-cert ".*garbage\.pem": not a PEM certificate$/],
      [{ tlsCert: cert, tlsKey: file('cert-as-key.pem', good.cert) }, /^--tls-key ".*cert-as-key\.pem": not a PEM private key/],
      [{ tlsCert: cert, tlsKey: file('other.pem', other.key) }, /^--tls-key ".*other\.pem": does not match the certificate in ".*cert\.pem"$/],
      [{ tlsCert: overMax, tlsKey: key }, /^--tls-cert ".*over-max\.pem": cannot read \(larger than 262144 bytes\)$/],
    ];
    for (const [files, message] of cases) {
      await assert.rejects(startProxy({ servers: [] }, { host: '127.0.0.1', port: 0, logLevel: 'error', ...files }), (err: Error & { code?: string }) => {
        assert.equal(err.code, 'TLS', err.message);
        assert.match(err.message, message);
        assert.ok(!err.message.includes(good.key.split('\n')[1]) && !err.message.includes(other.key.split('\n')[1]), 'no key material');
        return true;
      }, JSON.stringify(files));
    }
    const proxy = await startProxy({ servers: [] }, { host: '127.0.0.1', port: 0, logLevel: 'error', tlsCert: atMax, tlsKey: key });
    await proxy.close();
    assert.equal(proxy.url.slice(0, 8), 'https://');
  });
});

// ── 13. Doctor: replay Claude.ai's connect ──────────────────────────────────────────────────────────────

describe('13. Doctor: replay Claude.ai\'s connect', () => {
  before(async () => {
    await new Promise<void>((resolve, reject) => execFile(NODE, ['build.mjs'], { cwd: HERE }, (err) => (err ? reject(err) : resolve())));
  });

  type DoctorRun = { stdout(): string; stderr(): string; exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }> };

  /** `node dist/proxy.js doctor URL` as a subprocess; killed (and waited for) when the test ends. */
  function startDoctor(t: TestContext, url: string): DoctorRun {
    const child = spawn(NODE, [DIST, 'doctor', url], { cwd: HERE, env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    onCleanup(t, async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
      await assertAllGone([], [child.pid!]);
    });
    return { stdout: () => stdout, stderr: () => stderr, exited };
  }

  const httpWarning = (origin: string) => `WARN  URL: Claude.ai connects only to https:// on port 443; ${origin} will work for other clients only`;

  /** Runs doctor against a URL where it must fail: exit 1, and stdout exactly `lines` (after the "── URL" heading). */
  async function doctorFails(t: TestContext, url: string, lines: string[]): Promise<void> {
    const d = startDoctor(t, url);
    const exit = await within(d.exited, 30_000, 'doctor');
    assert.deepEqual(exit, { code: 1, signal: null }, `${d.stdout()}${d.stderr()}`);
    assert.equal(d.stdout(), [`── ${url}`, httpWarning(new URL(url).origin), ...lines].map((l) => `${l}\n`).join(''));
    assert.equal(d.stderr(), '');
  }

  it('a proxy with OAuth on, reached at its public URL: every step PASS, the printed URL approved as a person would (page, csrf, passphrase, the 303 to doctor\'s loopback callback), "OK    paste this URL", exit 0; its grant is revoked at the end', { timeout: 60_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    await op.h.proxy.ready(10_000);
    const endpoint = `${op.base}/alpha/mcp`;
    const d = startDoctor(t, endpoint);
    const ACT = "ACT   open this URL in a browser on this machine and approve with the proxy's passphrase:";
    const printed = await waitFor(() => new RegExp(`^${ACT}\\n      (\\S+)\\n`, 'm').exec(d.stdout())?.[1], 15_000, `the authorization URL (stdout: ${d.stdout()})`);
    const authorize = new URL(printed);
    assert.equal(`${authorize.origin}${authorize.pathname}`, `${op.base}/authorize`);
    assert.equal(authorize.searchParams.get('resource'), endpoint);
    const { page, location } = await consentApprove(op.base, printed);
    assert.match(page.text, /the server <b>alpha<\/b>/);
    assert.equal(location.origin, `http://127.0.0.1:${location.port}`, 'doctor listens on loopback');
    assert.equal(location.pathname, '/callback');
    assert.ok(location.searchParams.get('code'));
    assert.equal(location.searchParams.get('iss'), op.base);
    // The browser follows the 303 to doctor's listener.
    const landed = await request(location.href);
    assert.equal(landed.status, 200);
    assert.equal(landed.text, 'remote-mcp-proxy doctor: done, you can close this tab.');
    const exit = await within(d.exited, 30_000, 'doctor');
    assert.deepEqual(exit, { code: 0, signal: null }, `${d.stdout()}${d.stderr()}`);
    assert.equal(d.stdout(), [
      `── ${endpoint}`,
      httpWarning(op.base),
      `PASS  unauthenticated POST: 401 with resource_metadata ${op.base}/.well-known/oauth-protected-resource/alpha/mcp`,
      `PASS  protected resource metadata: resource matches; issuer ${op.base}`,
      'PASS  authorization server metadata: issuer, PKCE S256, registration and client_secret_post as Claude.ai needs',
      `${ACT}\n      ${printed}`,
      'PASS  login: registered, approved by the operator, token issued',
      'PASS  initialize and tools/list: 1 tools',
      `OK    paste this URL into Claude.ai (Settings → Connectors → Add custom connector): ${endpoint}`,
    ].map((l) => `${l}\n`).join(''));
    assert.equal(d.stderr(), '');
    // What it granted is gone: revoked by doctor itself, so the state file holds no grant and no client.
    const approvedLine = op.lines.find((l) => l.startsWith('info [oauth] operator approved client '));
    assert.match(approvedLine ?? '', /^info \[oauth\] operator approved client (.{8})… \("remote-mcp-proxy doctor"\) for alpha$/, op.lines.join('\n'));
    const clientPrefix = approvedLine!.slice('info [oauth] operator approved client '.length, 'info [oauth] operator approved client '.length + 8);
    assert.ok(op.lines.includes(`info [oauth] client ${clientPrefix}… revoked its grant`), op.lines.join('\n'));
    const state = oauthState(op);
    assert.deepEqual([state.clients, state.grants], [[], []]);
  });

  it('a proxy with static tokens only: FAIL at "401 challenge", naming that OAuth is off; exit 1', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [fixture('alpha')] }, { tokens: ['static-token-0123456789abcdef'], limits: FAST });
    await doctorFails(t, `${h.url}/alpha/mcp`, [
      'FAIL  401 challenge: WWW-Authenticate is "Bearer realm=\\"remote-mcp-proxy\\"", with no resource_metadata: Claude.ai cannot find how to log in; OAuth is off (set MCP_PROXY_PASSWORD and --public-url)',
    ]);
  });

  it('a proxy whose public URL is not the URL used: FAIL at "protected resource metadata", "resource is … but you connect to …"; exit 1', { timeout: 30_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    const used = `http://localhost:${op.port}/alpha/mcp`;
    await doctorFails(t, used, [
      `PASS  unauthenticated POST: 401 with resource_metadata ${op.base}/.well-known/oauth-protected-resource/alpha/mcp`,
      `FAIL  protected resource metadata: resource is "${op.base}/alpha/mcp" but you connect to ${used}: Claude.ai requires them equal (is --public-url the URL clients use?)`,
    ]);
    assert.equal(oauthRegisteredCount(op), 0, 'doctor stopped before registering');
  });

  it('a server name the proxy does not serve, with OAuth on: FAIL at "401 challenge", naming "no MCP endpoint"; exit 1', { timeout: 30_000 }, async (t) => {
    const op = await oauthProxy(t, TWO_FIXTURES());
    // An unknown path is refused before routing (401, no resource_metadata: there is no such resource); the
    // authorization server metadata at the root tells doctor that OAuth itself is on.
    await doctorFails(t, `${op.base}/nope/mcp`, [
      'FAIL  401 challenge: WWW-Authenticate is "Bearer realm=\\"remote-mcp-proxy\\"", with no resource_metadata: Claude.ai cannot find how to log in; OAuth is on, but this path is no MCP endpoint of the proxy (check the server name: /NAME/mcp)',
    ]);
  });

  it('nothing listening at the URL: FAIL at "unauthenticated POST", "connection refused"; exit 1', { timeout: 30_000 }, async (t) => {
    const port = await freePort();
    await doctorFails(t, `http://127.0.0.1:${port}/alpha/mcp`, [
      'FAIL  unauthenticated POST: connection refused (is the proxy running, and is this its address?)',
    ]);
  });

  // A malicious server, standing in for a proxy: what doctor prints comes from it.

  /** A fake proxy: 401 challenge, protected resource metadata `prm`, authorization server metadata `as` (or a trickle). */
  async function evilServer(t: TestContext, prm: (o: string) => Json, as: (o: string) => Json, trickle = false): Promise<{ origin: string; server: http.Server }> {
    const port = await freePort();
    const O = `http://127.0.0.1:${port}`;
    const timers = new Set<NodeJS.Timeout>();
    const server = http.createServer((req, res) => {
      req.resume();
      req.on('end', () => {
        const json = (o: unknown) => res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(o));
        if (req.url === '/memory/mcp') return res.writeHead(401, { 'www-authenticate': `Bearer resource_metadata="${O}/.well-known/oauth-protected-resource/memory/mcp"` }).end();
        if (req.url === '/.well-known/oauth-protected-resource/memory/mcp') {
          if (!trickle) return json(prm(O));
          res.writeHead(200, { 'content-type': 'application/json' });
          res.write('{');
          const timer = setInterval(() => res.write(' '), 50); // always busy: never idle for a step's timeout
          timers.add(timer);
          res.on('close', () => clearInterval(timer));
          return;
        }
        if (req.url === '/.well-known/oauth-authorization-server') return json(as(O));
        if (req.url === '/register') return res.writeHead(201, { 'content-type': 'application/json' }).end('{"client_id":"c","client_secret":"s"}');
        res.writeHead(404).end();
      });
    });
    server.on('close', () => timers.forEach(clearInterval));
    await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
    onCleanup(t, () => new Promise<void>((resolve) => {
      timers.forEach(clearInterval);
      server.closeAllConnections();
      server.close(() => resolve());
    }));
    return { origin: O, server };
  }

  /** Authorization server metadata that is complete and plausible, naming `issuer`, its endpoints on origin `o`. */
  const plausibleAs = (issuer: string) => (o: string): Json => ({
    issuer, authorization_endpoint: `${o}/authorize`, token_endpoint: `${o}/token`, registration_endpoint: `${o}/register`,
    revocation_endpoint: `${o}/revoke`, response_types_supported: ['code'], code_challenge_methods_supported: ['S256'],
    token_endpoint_auth_methods_supported: ['client_secret_post'],
  });

  // Hostile review (fixed in e28b5de): doctor followed an issuer anywhere, printed raw escapes, crashed on a
  // bad URL and waited forever on a trickle.
  it('against a malicious server: issuer on another site → FAIL "another site"; endpoints off the issuer\'s origin → FAIL "not on the issuer\'s origin"; issuer "not a url" → FAIL, no stack, exit 1; ESC bytes printed as \\x1b; a trickled answer gives up within stepTimeoutMs', { timeout: 30_000 }, async (t) => {
    /** Runs doctor where it must fail within 4 s: exit 1, nothing on stderr, stdout exactly `lines` after the heading, the http warning and the challenge's PASS. */
    const fails = async (origin: string, lines: string[]) => {
      const url = `${origin}/memory/mcp`;
      const d = startDoctor(t, url);
      const exit = await within(d.exited, 4_000, `doctor ${url}`).catch((err: Error) => {
        throw new Error(`${err.message}; stdout so far: ${JSON.stringify(d.stdout())}`);
      });
      assert.equal(d.stdout(), [
        `── ${url}`, httpWarning(origin), `PASS  unauthenticated POST: 401 with resource_metadata ${origin}/.well-known/oauth-protected-resource/memory/mcp`, ...lines,
      ].map((l) => `${l}\n`).join(''));
      assert.deepEqual([exit, d.stderr()], [{ code: 1, signal: null }, '']);
      return d.stdout();
    };

    // The issuer (where the passphrase is typed) is another site, complete and plausible.
    const phishing = await evilServer(t, () => ({}), (o) => plausibleAs(o)(o));
    const elsewhere = await evilServer(t, (o) => ({ resource: `${o}/memory/mcp`, authorization_servers: [phishing.origin] }), () => ({}));
    await fails(elsewhere.origin, [`FAIL  protected resource metadata: the issuer ${phishing.origin} is another site than ${elsewhere.origin}: not this proxy's login`]);

    // The issuer is this origin, but the endpoints it advertises are third parties'.
    const offsite = await evilServer(t, (o) => ({ resource: `${o}/memory/mcp`, authorization_servers: [o] }), (o) => ({
      ...plausibleAs(o)(o), authorization_endpoint: 'https://login-mcp-example.attacker.example/authorize',
      token_endpoint: 'http://127.0.0.1:1/token-third-party', revocation_endpoint: 'https://collector.attacker.example/revoke',
    }));
    await fails(offsite.origin, [`PASS  protected resource metadata: resource matches; issuer ${offsite.origin}`,
      `FAIL  authorization server metadata: authorization_endpoint, token_endpoint, revocation_endpoint not on the issuer's origin ${offsite.origin}`]);

    // An issuer that is not a URL: a FAIL line, not a crash.
    const notUrl = await evilServer(t, (o) => ({ resource: `${o}/memory/mcp`, authorization_servers: ['not a url'] }), () => ({}));
    await fails(notUrl.origin, ['FAIL  protected resource metadata: authorization_servers names no issuer URL']);

    // Terminal escapes in the issuer: printed escaped, never raw.
    const ESC = '\x1b[2J\x1b[H\x1b[32mPASS  everything fine, paste your passphrase below\x1b[0m';
    const SHOWN = '\\x1b[2J\\x1b[H\\x1b[32mPASS  everything fine, paste your passphrase below\\x1b[0m';
    const escape = await evilServer(t, (o) => ({ resource: `${o}/memory/mcp`, authorization_servers: [`${o}/#${ESC}`] }), (o) => ({ ...plausibleAs(`${o}/#x`)(o) }));
    const shown = await fails(escape.origin, [`PASS  protected resource metadata: resource matches; issuer ${escape.origin}/#${SHOWN}`,
      `FAIL  authorization server metadata: issuer is "${escape.origin}/#x", not ${escape.origin}/#${SHOWN}`]);
    assert.ok(!shown.includes('\x1b'), `no raw ESC in ${JSON.stringify(shown)}`);

    // A server that trickles its answer a byte at a time: doctor gives up after stepTimeoutMs for the whole step.
    const slow = await evilServer(t, () => ({}), () => ({}), true);
    const out: string[] = [];
    const started = Date.now();
    const done = doctor(`${slow.origin}/memory/mcp`, { stepTimeoutMs: 300, consentTimeoutMs: 1_000, out: (l) => out.push(l) });
    let ok: boolean;
    try {
      ok = await within(done, 3_000, 'doctor against a trickling server');
    } finally {
      slow.server.closeAllConnections(); // lets a doctor still waiting finish
      await done.catch(() => false);
    }
    assert.equal(ok, false);
    assert.ok(Date.now() - started < 3_000);
    assert.equal(out.at(-1), `FAIL  protected resource metadata: ${slow.origin}/.well-known/oauth-protected-resource/memory/mcp: no answer in time (Claude.ai gives up after 10 s)`);
  });

  // Since fba7c1f: for a host route ({name}.{domain}) the issuer is the public origin {domain}, exactly one label
  // above the target's host; before, any parent domain passed (a hosting provider's shared domain, a bare TLD).
  it('an issuer on a parent domain passes only one label above the target\'s host (http://mcp.test:I for http://alpha.mcp.test:T); two labels above, a single-label host (http://test:I for http://alpha.test:T) or a look-alike suffix (evilmcp.test) → FAIL "another site"', { timeout: 20_000 }, async (t) => {
    // Doctor runs in this process here, so that names under .test resolve to 127.0.0.1 (for this test only).
    const realLookup = dns.lookup;
    const fakeLookup = (host: string, options: unknown, callback?: unknown) => {
      const to = host === 'test' || host.endsWith('.test') ? '127.0.0.1' : host;
      return (realLookup as (h: string, o: unknown, c?: unknown) => void)(to, options, callback);
    };
    dns.lookup = fakeLookup as typeof dns.lookup;
    onCleanup(t, () => {
      dns.lookup = realLookup;
    });
    const portOf = (origin: string) => new URL(origin).port;
    // The issuer's metadata names endpoints on 127.0.0.1, another origin: a run that gets past the issuer check
    // stops at the next step with that FAIL instead of waiting for a consent.
    const issuerAt = (host: string) => evilServer(t, () => ({}), (o) => plausibleAs(`http://${host}:${portOf(o)}`)(o));
    const run = async (targetHost: string, issuerHost: string): Promise<{ target: string; issuer: string; out: string[] }> => {
      const issuer = `http://${issuerHost}:${portOf((await issuerAt(issuerHost)).origin)}`;
      let target = '';
      const server = await evilServer(t, (o) => ({ resource: target, authorization_servers: [issuer] }), () => ({}));
      target = `http://${targetHost}:${portOf(server.origin)}/memory/mcp`;
      const out: string[] = [];
      const ok = await within(doctor(target, { stepTimeoutMs: 2_000, consentTimeoutMs: 1_000, out: (l) => out.push(l) }), 10_000, `doctor ${target}`);
      assert.equal(ok, false);
      const origin = new URL(target).origin;
      assert.deepEqual(out.slice(0, 2), [httpWarning(origin), `PASS  unauthenticated POST: 401 with resource_metadata ${server.origin}/.well-known/oauth-protected-resource/memory/mcp`]);
      return { target: origin, issuer, out: out.slice(2) };
    };
    // One label above: the issuer passes; doctor goes on to its metadata.
    let r = await run('alpha.mcp.test', 'mcp.test');
    assert.deepEqual(r.out, [
      `PASS  protected resource metadata: resource matches; issuer ${r.issuer}`,
      `FAIL  authorization server metadata: authorization_endpoint, token_endpoint, registration_endpoint, revocation_endpoint not on the issuer's origin ${r.issuer}`,
    ]);
    for (const [targetHost, issuerHost] of [['x.alpha.mcp.test', 'mcp.test'], ['alpha.test', 'test'], ['evilmcp.test', 'mcp.test']]) {
      r = await run(targetHost, issuerHost);
      assert.deepEqual(r.out, [`FAIL  protected resource metadata: the issuer ${r.issuer} is another site than ${r.target}: not this proxy's login`], `${targetHost} under ${issuerHost}`);
    }
  });
});
// ── 14. CLI and main ────────────────────────────────────────────────────────────────────────────────────

describe('14. CLI and main', () => {

  it('parseCli() defaults: serve ./config.json on 127.0.0.1:8080 with no tokens', () => {
    const r = parseCli([], {});
    assert.ok(!('error' in r), JSON.stringify(r));
    assert.equal(r.command, 'serve');
    assert.equal(path.resolve(r.options.configPath), path.resolve('config.json'));
    assert.equal(r.options.host, '127.0.0.1');
    assert.equal(r.options.port, 8080);
    assert.deepEqual(r.options.tokens, []);
    assert.equal(r.options.allowUnauthenticated, false);
    assert.deepEqual(r.options.corsOrigins, []);
  });

  it('parseCli() reads every flag; --token repeats; --token-file reads one token per line', () => {
    const dir = tmpDir('cli');
    const tokenFile = path.join(dir, 'tokens');
    fs.writeFileSync(tokenFile, '# ops tokens (README: # comments)\nfile-token-0000000001\n\nfile-token-0000000002\n');
    const r = parseCli(
      ['--config', '/etc/p.json', '--host', '::1', '--port', '9443', '--token', 'flag-token-00000001', '--token', 'flag-token-00000002', '--token-file', tokenFile,
        '--allow-unauthenticated', '--allow-origin', 'https://a.example', '--allow-origin', 'https://b.example',
        '--cors-origin', 'https://c.example', '--log-level', 'debug'],
      {},
    );
    assert.ok(!('error' in r), JSON.stringify(r));
    assert.equal(r.command, 'serve');
    assert.equal(r.options.configPath, '/etc/p.json');
    assert.equal(r.options.host, '::1');
    assert.equal(r.options.port, 9443);
    assert.deepEqual([...r.options.tokens].sort(), ['file-token-0000000001', 'file-token-0000000002', 'flag-token-00000001', 'flag-token-00000002']);
    assert.equal(r.options.allowUnauthenticated, true);
    assert.deepEqual(r.options.allowedOrigins, ['https://a.example', 'https://b.example']);
    assert.deepEqual(r.options.corsOrigins, ['https://c.example']);
    assert.equal(r.options.logLevel, 'debug');
  });

  it('parseCli() reads MCP_PROXY_* environment variables; flags win over them', () => {
    const dir = tmpDir('cli');
    const tokenFile = path.join(dir, 'tokens');
    fs.writeFileSync(tokenFile, 'env-file-token-00000001\n');
    const env = {
      MCP_PROXY_CONFIG: '/env/config.json',
      MCP_PROXY_HOST: '127.0.0.2',
      MCP_PROXY_PORT: '9000',
      MCP_PROXY_TOKEN: 'env-token-00000001,env-token-00000002',
      MCP_PROXY_TOKEN_FILE: tokenFile,
      MCP_PROXY_ALLOW_UNAUTHENTICATED: 'true',
      MCP_PROXY_LOG_LEVEL: 'warn',
    };
    const r = parseCli([], env);
    assert.ok(!('error' in r), JSON.stringify(r));
    assert.equal(r.options.configPath, '/env/config.json');
    assert.equal(r.options.host, '127.0.0.2');
    assert.equal(r.options.port, 9000);
    assert.deepEqual([...r.options.tokens].sort(), ['env-file-token-00000001', 'env-token-00000001', 'env-token-00000002']);
    assert.equal(r.options.allowUnauthenticated, true);
    assert.equal(r.options.logLevel, 'warn');
    const one = parseCli([], { MCP_PROXY_ALLOW_UNAUTHENTICATED: '1' });
    assert.ok(!('error' in one) && one.options.allowUnauthenticated === true);
    const flags = parseCli(['--port', '9001', '--host', '127.0.0.3', '--config', '/flag.json'], env);
    assert.ok(!('error' in flags));
    assert.equal(flags.options.port, 9001);
    assert.equal(flags.options.host, '127.0.0.3');
    assert.equal(flags.options.configPath, '/flag.json');
  });

  it('parseCli() recognises check, --help and -h', () => {
    for (const [argv, command] of [[['check'], 'check'], [['check', '--config', 'x.json'], 'check'], [['--help'], 'help'], [['-h'], 'help']] as const) {
      const r = parseCli([...argv], {});
      assert.ok(!('error' in r), `${argv.join(' ')}: ${JSON.stringify(r)}`);
      assert.equal(r.command, command);
    }
  });

  it('parseCli() accepts ports 1 and 65535 and rejects 65536, -1, 1.5 and words', () => {
    for (const port of ['1', '65535']) {
      const r = parseCli(['--port', port], {});
      assert.ok(!('error' in r) && r.options.port === Number(port), port);
    }
    for (const port of ['65536', '-1', '1.5', 'http', '8080x']) {
      assert.deepEqual(parseCli(['--port', port], {}), { error: `--port: got ${JSON.stringify(port)}, expected a number from 0 to 65535` });
    }
    assert.deepEqual(parseCli([], { MCP_PROXY_PORT: 'eighty' }), { error: '--port: got "eighty", expected a number from 0 to 65535' });
  });

  it('parseCli() rejects unknown flags, missing values, bad log levels and unreadable token files', () => {
    const cases: [string[], string][] = [
      [['--nope'], 'unknown argument "--nope"'],
      [['serve-me'], 'unknown argument "serve-me"'],
      [['--token'], '--token needs a value'],
      [['--config'], '--config needs a value'],
      [['--log-level', 'loud'], '--log-level: got "loud", expected one of error, warn, info, debug'],
      [['--log-format', 'xml'], '--log-format: got "xml", expected one of text, json'],
      [['--token-file', '/nonexistent/tokens'], '--token-file: cannot read "/nonexistent/tokens" (ENOENT)'],
    ];
    for (const [argv, error] of cases) assert.deepEqual(parseCli(argv, {}), { error }, argv.join(' '));
  });

  it('parseCli() --tls-cert/--tls-key (MCP_PROXY_TLS_CERT/_KEY) go together; one alone is an error naming the other', () => {
    const both = parseCli(['--tls-cert', '/c.pem', '--tls-key', '/k.pem'], {});
    assert.ok(!('error' in both) && both.options.tlsCert === '/c.pem' && both.options.tlsKey === '/k.pem', JSON.stringify(both));
    const env = parseCli([], { MCP_PROXY_TLS_CERT: '/env/c.pem', MCP_PROXY_TLS_KEY: '/env/k.pem' });
    assert.ok(!('error' in env) && env.options.tlsCert === '/env/c.pem' && env.options.tlsKey === '/env/k.pem', JSON.stringify(env));
    const flagWins = parseCli(['--tls-cert', '/flag.pem'], { MCP_PROXY_TLS_CERT: '/env/c.pem', MCP_PROXY_TLS_KEY: '/env/k.pem' });
    assert.ok(!('error' in flagWins) && flagWins.options.tlsCert === '/flag.pem' && flagWins.options.tlsKey === '/env/k.pem');
    const none = parseCli([], {});
    assert.ok(!('error' in none) && none.options.tlsCert === undefined && none.options.tlsKey === undefined);
    assert.deepEqual(parseCli(['--tls-cert', '/c.pem'], {}), { error: '--tls-cert needs --tls-key too (MCP_PROXY_TLS_CERT and MCP_PROXY_TLS_KEY): HTTPS needs both the certificate and its key' });
    assert.deepEqual(parseCli([], { MCP_PROXY_TLS_KEY: '/k.pem' }), { error: '--tls-key needs --tls-cert too (MCP_PROXY_TLS_CERT and MCP_PROXY_TLS_KEY): HTTPS needs both the certificate and its key' });
  });

  it('parseCli() --start-concurrency (MCP_PROXY_START_CONCURRENCY) takes 1 to 64; 0, 65, 1.5, -1 and words are refused', () => {
    for (const n of ['1', '64']) {
      const r = parseCli(['--start-concurrency', n], {});
      assert.ok(!('error' in r) && r.options.startConcurrency === Number(n), n);
    }
    const env = parseCli([], { MCP_PROXY_START_CONCURRENCY: '2' });
    assert.ok(!('error' in env) && env.options.startConcurrency === 2);
    const unset = parseCli([], {});
    assert.ok(!('error' in unset) && unset.options.startConcurrency === undefined);
    for (const n of ['0', '65', '1.5', '-1', 'four']) {
      assert.deepEqual(parseCli(['--start-concurrency', n], {}), { error: `--start-concurrency: got ${JSON.stringify(n)}, expected an integer from 1 to 64` }, n);
    }
    assert.deepEqual(parseCli([], { MCP_PROXY_START_CONCURRENCY: '0' }), { error: '--start-concurrency: got "0", expected an integer from 1 to 64' });
  });

  it('startProxy() startConcurrency: 1 starts one child at a time (three 600 ms initializes take at least 1.8 s)', { timeout: 20_000 }, async (t) => {
    const servers = ['s1', 's2', 's3'].map((name) => fixture(name, 'slowinit', { env: { FIXTURE_INIT_DELAY_MS: '600' } }));
    const t0 = Date.now();
    const h = await harness(t, { servers }, { limits: FAST, startConcurrency: 1 });
    await h.proxy.ready(10_000);
    // In turn they cannot be faster than 3 × 600 ms; together (the default, 4) they took 0.9 s here, loaded.
    assert.ok(Date.now() - t0 >= 1_800, `ready after ${Date.now() - t0} ms: the children initialized together`);
  });

  it('checkHost() warns, naming the server and the fix: a command not on the PATH the child gets or not executable, an npx package not baked into --packages-dir, a per-session server at the default idle timeout', () => {
    const dir = tmpDir('check');
    const bin = path.join(dir, 'bin');
    const elsewhere = path.join(dir, 'elsewhere');
    fs.mkdirSync(bin);
    fs.mkdirSync(elsewhere);
    fs.writeFileSync(path.join(bin, 'mytool'), '#!/bin/sh\n', { mode: 0o755 });
    fs.writeFileSync(path.join(bin, 'notexec'), '#!/bin/sh\n', { mode: 0o644 });
    fs.writeFileSync(path.join(elsewhere, 'onlyhere'), '#!/bin/sh\n', { mode: 0o755 });
    // Scripts whose interpreter is missing run nowhere (spawn: ENOENT); `#!/usr/bin/env NAME` needs NAME on the PATH.
    fs.writeFileSync(path.join(bin, 'shebang-missing'), '#!/nonexistent/interpreter -x\n', { mode: 0o755 });
    fs.writeFileSync(path.join(bin, 'env-missing'), '#!/usr/bin/env no-such-interpreter-xyz\n', { mode: 0o755 });
    fs.writeFileSync(path.join(bin, 'env-ok'), '#!/usr/bin/env mytool\n', { mode: 0o755 });
    const packagesDir = path.join(dir, 'packages');
    fs.mkdirSync(path.join(packagesDir, 'node_modules', 'baked-pkg'), { recursive: true });
    fs.writeFileSync(path.join(packagesDir, 'node_modules', 'baked-pkg', 'package.json'), JSON.stringify({ name: 'baked-pkg', bin: 'cli.js' }));
    const servers = [
      srv('found', [], { command: 'mytool' }),
      srv('absolute', [], { command: NODE }),
      srv('own-path', [], { command: 'onlyhere', env: { PATH: elsewhere } }), // the config's env.PATH is the one searched
      srv('relative', [], { command: './mytool', cwd: bin }),
      srv('baked', ['-y', 'baked-pkg@1.0.0'], { command: 'npx' }),
      srv('short', [], { command: 'mytool', sessions: 'per-session', idleTimeoutMs: 60_000 }),
      srv('missing', [], { command: 'no-such-command-xyz' }),
      srv('noexec', [], { command: 'notexec' }),
      srv('abs-missing', [], { command: path.join(dir, 'absent') }),
      srv('unbaked', ['-y', '@scope/not-baked@2'], { command: 'npx' }),
      srv('each', [], { command: 'mytool', sessions: 'per-session' }),
      srv('shebang', [], { command: 'shebang-missing' }),
      srv('env-missing', [], { command: 'env-missing' }),
      srv('env-ok', [], { command: 'env-ok' }),
    ];
    const { errors, warnings } = checkHost({ servers }, 'cfg.json', { env: { PATH: bin }, packagesDir });
    assert.deepEqual(errors, []);
    assert.deepEqual(warnings, [
      'cfg.json: mcpServers.missing.command: "no-such-command-xyz" is not found on the PATH the server gets (the proxy\'s PATH, or its "env".PATH): install it, or give its absolute path',
      `cfg.json: mcpServers.noexec.command: "notexec" resolves to ${path.join(bin, 'notexec')}, which is not an executable file: chmod +x it, or name the interpreter`,
      `cfg.json: mcpServers.abs-missing.command: ${JSON.stringify(path.join(dir, 'absent'))} does not exist: give the path of an installed program`,
      `cfg.json: mcpServers.unbaked.command: \`npx @scope/not-baked\` is not baked into ${packagesDir}, and npx is not on the PATH the server gets; the distroless image has neither npx nor network: ` +
        `bake it into the image (docker build --build-arg MCP_NPM_PACKAGES="@scope/not-baked" …), or install it under ${packagesDir}/node_modules`,
      'cfg.json: mcpServers.each: "sessions": "per-session" keeps a process for each client session until it has been idle 300000 ms (clients rarely end their sessions); set a shorter "idleTimeoutMs", e.g. 60000',
      `cfg.json: mcpServers.shebang.command: "shebang-missing" (${path.join(bin, 'shebang-missing')}) is a script for /nonexistent/interpreter, which is not here: install it, or run the script with an interpreter that is`,
      `cfg.json: mcpServers.env-missing.command: "env-missing" (${path.join(bin, 'env-missing')}) runs "no-such-interpreter-xyz" through /usr/bin/env, and "no-such-interpreter-xyz" is not on the PATH the server gets: install it, or put its directory on that PATH`,
    ]);
    // C2 (hostile review): with no PATH at all, spawn searches /usr/bin:/bin (libuv), and so does check.
    assert.deepEqual(checkHost({ servers: [srv('ls', [], { command: 'ls' })] }, 'cfg.json', { env: {}, packagesDir: undefined }).warnings, []);
    // Without --packages-dir an npx command is a command like any other; with npx on the PATH the package is downloaded.
    fs.writeFileSync(path.join(bin, 'npx'), '#!/bin/sh\n', { mode: 0o755 });
    const unbaked = servers.filter((server) => server.name === 'unbaked');
    assert.deepEqual(checkHost({ servers: unbaked }, 'cfg.json', { env: { PATH: bin }, packagesDir: undefined }).warnings, []);
    assert.match(checkHost({ servers: unbaked }, 'cfg.json', { env: { PATH: bin }, packagesDir }).warnings.join('\n'), /is not baked into .*, and npx downloads it at every start \(that needs the network\)/);
  });

  it('parseConfig() lists each ${VAR:-default} whose VAR is unset or empty (server, field and variable, never a value) for check; a set VAR is not listed', () => {
    const text = JSON.stringify({ mcpServers: { s: { command: 'x', args: ['--level=${LEVEL:-info}', '${SET_VAR:-nope}'], env: { K: '${EMPTY:-d}' } } } });
    const r = parseConfig(text, 'cfg.json', { SET_VAR: 'value-of-set-var', EMPTY: '' });
    assert.ok(r.config, r.errors.join('\n'));
    assert.deepEqual(r.defaulted, [
      'cfg.json: mcpServers.s.args[0]: ${LEVEL} is not set, so the default written in the config is used',
      'cfg.json: mcpServers.s.env.K: ${EMPTY} is empty, so the default written in the config is used',
    ]);
    assert.deepEqual(r.warnings, []);
  });

  describe('node dist/proxy.js', () => {
    before(async () => {
      await new Promise<void>((resolve, reject) =>
        execFile(NODE, ['build.mjs'], { cwd: HERE }, (err) => (err ? reject(err) : resolve())),
      );
    });

    type Ran = { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string };
    function run(args: string[], env = cleanEnv(), timeoutMs = 15_000): Promise<Ran> {
      return new Promise((resolve, reject) => {
        execFile(NODE, [DIST, ...args], { cwd: HERE, env, timeout: timeoutMs }, (err, stdout, stderr) => {
          const e = err as (Error & { code?: number | string; signal?: NodeJS.Signals }) | null;
          if (e && typeof e.code !== 'number' && e.code !== undefined) return reject(e);
          resolve({ code: e ? (e.code as number) ?? null : 0, signal: e?.signal ?? null, stdout, stderr });
        });
      });
    }

    function writeConfig(obj: unknown): string {
      const file = path.join(tmpDir('cli'), 'config.json');
      fs.writeFileSync(file, typeof obj === 'string' ? obj : JSON.stringify(obj));
      return file;
    }

    it('--help prints usage and exits 0', async () => {
      const r = await run(['--help']);
      assert.equal(r.code, 0, r.stderr);
      const out = r.stdout + r.stderr;
      for (const word of ['--config', '--port', '--token', '--allow-unauthenticated', 'check']) assert.ok(out.includes(word), `help mentions ${word}`);
    });

    it('check with a good config exits 0 and says config OK', async () => {
      const cfg = writeConfig({ mcpServers: { a: { command: 'node', args: ['x.js'] }, r: { url: 'https://x.example/mcp' } } });
      const r = await run(['check', '--config', cfg]);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout + r.stderr, /config OK/);
    });

    it('check warns (exit 0, a "warning: " line each, config OK) about a command not on the PATH, an npx package not baked, ${VAR:-default} with VAR unset and a per-session server without idleTimeoutMs', async () => {
      const packages = tmpDir('cli-packages');
      const cfg = writeConfig({ mcpServers: {
        gone: { command: 'no-such-command-xyz' },
        unbaked: { command: 'npx', args: ['-y', '@example/not-baked'] },
        dflt: { command: NODE, args: ['${RMP_TEST_UNSET_VAR:-fallback-value}'] },
        each: { command: NODE, args: ['x.js'], sessions: 'per-session' },
      } });
      const r = await run(['check', '--config', cfg, '--packages-dir', packages]);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /config OK/);
      assert.equal(r.stderr.split('\n').filter((l) => l.startsWith('warning: ')).length, 4, r.stderr);
      assert.match(r.stderr, /^warning: .*mcpServers\.gone\.command: "no-such-command-xyz" is not found on the PATH/m);
      assert.match(r.stderr, /^warning: .*mcpServers\.unbaked\.command: `npx @example\/not-baked` is not baked into .*MCP_NPM_PACKAGES="@example\/not-baked"/m);
      assert.match(r.stderr, /^warning: .*mcpServers\.dflt\.args\[0\]: \$\{RMP_TEST_UNSET_VAR\} is not set, so the default written in the config is used$/m);
      assert.match(r.stderr, /^warning: .*mcpServers\.each: "sessions": "per-session" .*"idleTimeoutMs", e\.g\. 60000$/m);
      assert.doesNotMatch(r.stderr, /fallback-value/);
    });

    it('check with a bad config exits 1 and prints each error line on stderr', async () => {
      const cfg = writeConfig({ mcpServers: { memory: { command: 'npx', args: 5 }, '!!!': { command: 'x' } } });
      const r = await run(['check', '--config', cfg]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /mcpServers\.memory\.args/);
      assert.match(r.stderr, /"!!!": invalid server name/);
      assert.doesNotMatch(r.stdout, /config OK/);
    });

    it('check with a missing config file exits 1 naming the path', async () => {
      const missing = path.join(tmpDir('cli'), 'absent.json');
      const r = await run(['check', '--config', missing]);
      assert.equal(r.code, 1);
      assert.ok(r.stderr.includes(missing), r.stderr);
    });

    it('a bad flag exits 2 with the message and a pointer to --help', async () => {
      const r = await run(['--port', 'eighty']);
      assert.equal(r.code, 2);
      assert.ok(r.stderr.startsWith('remote-mcp-proxy: --port: got "eighty", expected a number from 0 to 65535'), r.stderr);
      assert.match(r.stderr, /--help/);
    });

    it('refuses --host 0.0.0.0 without a token or --allow-unauthenticated (exit 1, no listener)', async () => {
      const cfg = writeConfig({ mcpServers: { f: { command: NODE, args: ['-e', FIXTURE] } } });
      const port = await freePort();
      const r = await run(['--config', cfg, '--host', '0.0.0.0', '--port', String(port)]);
      assert.equal(r.code, 1);
      assert.match(r.stdout + r.stderr, /token|unauthenticated/i);
      const viaEnv = await run(['--config', cfg, '--port', String(port)], { ...cleanEnv(), MCP_PROXY_HOST: '0.0.0.0' });
      assert.equal(viaEnv.code, 1);
    });

    async function serve(t: TestContext, args: string[], env = cleanEnv()) {
      const pidFile = path.join(tmpDir('cli'), 'pids');
      const cfg = writeConfig({ mcpServers: { fix: { command: NODE, args: ['-e', FIXTURE], env: { FIXTURE_PIDFILE: pidFile } } } });
      const port = await freePort();
      const child: ChildProcess = spawn(NODE, [DIST, '--config', cfg, '--port', String(port), ...args], { cwd: HERE, env, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
      const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
        child.on('exit', (code, signal) => resolve({ code, signal })),
      );
      const childPids = () => (fs.existsSync(pidFile) ? fs.readFileSync(pidFile, 'utf8').split('\n').filter(Boolean).map(Number) : []);
      t.after(async () => {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        await exited;
        await assertAllGone(childPids());
      });
      await waitFor(() => out.includes(`://127.0.0.1:${port}/fix/mcp`) || child.exitCode !== null, 15_000, 'start-up log'); // http or https
      await waitFor(() => childPids().length > 0, 10_000, 'child spawned');
      return { child, port, exited, output: () => out, childPids };
    }

    it('serve logs each endpoint and the auth state; SIGTERM exits 0 and stops the children', { timeout: 40_000 }, async (t) => {
      const s = await serve(t, []);
      const out = s.output();
      assert.ok(out.includes(`http://127.0.0.1:${s.port}/fix/mcp`), out);
      assert.ok(out.includes(`/fix/sse`), out);
      assert.match(out, /auth/i);
      assert.equal((await request(`http://127.0.0.1:${s.port}/healthz`)).status, 200);
      await waitFor(async () => (await request(`http://127.0.0.1:${s.port}/readyz`)).status === 200, 10_000, 'ready');
      const pids = s.childPids();
      s.child.kill('SIGTERM');
      const exit = await within(s.exited, 15_000, 'exit after SIGTERM');
      assert.deepEqual(exit, { code: 0, signal: null });
      await assertAllGone(pids);
    });

    it('serve --tls-cert/--tls-key prints https:// URLs and serves HTTPS; healthcheck with MCP_PROXY_TLS_* exits 0 (without: 1); check refuses a key of another certificate', { timeout: 40_000 }, async (t) => {
      const dir = tmpDir('cli-tls');
      const [mine, other] = [selfSignedCert('cli'), selfSignedCert('other')];
      const certFile = path.join(dir, 'cert.pem');
      const keyFile = path.join(dir, 'key.pem');
      const otherKey = path.join(dir, 'other-key.pem');
      fs.writeFileSync(certFile, mine.cert);
      fs.writeFileSync(keyFile, mine.key);
      fs.writeFileSync(otherKey, other.key);
      const s = await serve(t, ['--tls-cert', certFile, '--tls-key', keyFile]);
      assert.ok(s.output().includes(`listening on https://127.0.0.1:${s.port} `), s.output());
      assert.ok(s.output().includes(`https://127.0.0.1:${s.port}/fix/mcp`), s.output());
      assert.equal(await newConnectionFingerprint(s.port, [mine.cert]), mine.fingerprint);
      const tlsEnv = { ...cleanEnv(), MCP_PROXY_TLS_CERT: certFile, MCP_PROXY_TLS_KEY: keyFile };
      assert.equal((await run(['healthcheck', '--port', String(s.port)], tlsEnv)).code, 0, 'healthcheck over HTTPS');
      assert.equal((await run(['healthcheck', '--port', String(s.port)])).code, 1, 'plain HTTP to the HTTPS port fails');
      const cfg = writeConfig({ mcpServers: { a: { command: NODE, args: ['x.js'] } } });
      const bad = await run(['check', '--config', cfg, '--tls-cert', certFile, '--tls-key', otherKey]);
      assert.equal(bad.code, 1, bad.stderr);
      assert.match(bad.stderr, /^error: --tls-key ".*other-key\.pem": does not match the certificate in ".*cert\.pem"$/m);
      s.child.kill('SIGTERM');
      assert.deepEqual(await within(s.exited, 15_000, 'exit after SIGTERM'), { code: 0, signal: null });
    });

    it('--log-format json: every line is one JSON object with time, level and component, and a server\'s lines name it', { timeout: 40_000 }, async (t) => {
      const s = await serve(t, ['--log-format', 'json']);
      await waitFor(async () => (await request(`http://127.0.0.1:${s.port}/readyz`)).status === 200, 10_000, 'ready');
      const lines = s.output().split('\n').filter(Boolean);
      const events = lines.map((line) => {
        const event = JSON.parse(line);
        assert.equal(typeof event.time, 'string', line);
        assert.ok(['error', 'warn', 'info', 'debug'].includes(event.level), line);
        assert.equal(typeof event.component, 'string', line);
        assert.equal(typeof event.msg, 'string', line);
        return event;
      });
      assert.ok(events.some((e) => e.component === 'proxy' && e.msg.includes(`http://127.0.0.1:${s.port}/fix/mcp`)), lines.join('\n'));
      assert.ok(events.some((e) => e.component === 'server' && e.server === 'fix' && /^started pid/.test(e.msg)), lines.join('\n'));
      assert.ok(events.some((e) => e.component === 'server' && e.server === 'fix' && /^ready/.test(e.msg)), lines.join('\n'));
      s.child.kill('SIGTERM');
      assert.deepEqual(await within(s.exited, 15_000, 'exit after SIGTERM'), { code: 0, signal: null });
      // The child's stop, with its reason, at info; and still one object a line.
      const after = s.output().split('\n').filter(Boolean).map((line) => JSON.parse(line));
      assert.ok(after.some((e) => e.level === 'info' && e.server === 'fix' && /^pid \d+ stopped \(shutdown\)$/.test(e.msg)), s.output());
      // A config that cannot load, and a refused start, are JSON lines too (for the collector), not plain text.
      const bad = writeConfig({ mcpServers: { fix: { command: NODE, args: 5 } } });
      const refused = await run(['--config', bad, '--log-format', 'json']);
      assert.equal(refused.code, 1);
      const [event] = refused.stderr.split('\n').filter(Boolean).map((line) => JSON.parse(line));
      assert.deepEqual({ level: event.level, component: event.component }, { level: 'error', component: 'config' });
      assert.match(event.msg, /mcpServers\.fix\.args: got number, expected an array of strings$/);
      // A server named like a part of the proxy would be labelled as that part: said at load.
      assert.deepEqual(parseConfig(JSON.stringify({ mcpServers: { proxy: { command: 'x' }, audit: { command: 'y' }, fine: { command: 'z' } } }), 'c.json').warnings.map((w) => w.split(':')[1]),
        [' mcpServers.proxy', ' mcpServers.audit']);
      const unsafe = await run(['--config', writeConfig({ mcpServers: {} }), '--log-format', 'json', '--host', '0.0.0.0', '--port', String(await freePort())]);
      assert.equal(unsafe.code, 1);
      assert.match(JSON.parse(unsafe.stderr.split('\n').filter(Boolean).at(-1)!).msg, /refusing to serve without authentication/);
    });

    it('SIGTERM with a request in flight: it is answered within the drain grace, then the proxy exits 0 and no child remains', { timeout: 40_000 }, async (t) => {
      const s = await serve(t, []);
      const base = `http://127.0.0.1:${s.port}`;
      await waitFor(async () => (await request(`${base}/readyz`)).status === 200, 10_000, 'ready');
      const sid = await rawSession(base, 'fix');
      const slow = post(`${base}/fix/mcp`, call('slow', { what: 'slow', ms: 1_500 }), sessionHeaders(sid));
      await waitFor(() => s.output().includes('slow started'), 5_000, 'the slow call running on the child');
      const pids = s.childPids();
      s.child.kill('SIGTERM');
      assert.equal(answerText(await within(slow, 10_000, 'the slow call\'s answer')), 'slow done');
      assert.deepEqual(await within(s.exited, 15_000, 'exit after SIGTERM'), { code: 0, signal: null });
      await assertAllGone(pids);
    });

    it('SIGTERM does not wait for a request whose client has left: the drain ends at once and the proxy exits 0', { timeout: 40_000 }, async (t) => {
      const s = await serve(t, []);
      const base = `http://127.0.0.1:${s.port}`;
      await waitFor(async () => (await request(`${base}/readyz`)).status === 200, 10_000, 'ready');
      const sid = await rawSession(base, 'fix');
      const body = JSON.stringify(call('left', { what: 'slow', ms: 30_000 }));
      const req = http.request(`${base}/fix/mcp`, { method: 'POST', headers: { ...sessionHeaders(sid), 'content-type': 'application/json', accept: 'application/json, text/event-stream' } });
      req.on('error', () => {});
      req.end(body);
      await waitFor(() => s.output().includes('slow started'), 5_000, 'the slow call running on the child');
      req.destroy();
      const pids = s.childPids();
      const t0 = Date.now();
      // The proxy sees the close before the signal: a request on another connection is answered after it.
      await post(`${base}/fix/mcp`, { jsonrpc: '2.0', id: 'after', method: 'ping' }, sessionHeaders(sid));
      s.child.kill('SIGTERM');
      assert.deepEqual(await within(s.exited, 15_000, 'exit after SIGTERM'), { code: 0, signal: null });
      assert.ok(Date.now() - t0 < 4_500, `the drain waited for a client that left (${Date.now() - t0} ms; the grace is 5 s)`);
      await assertAllGone(pids);
    });

    it('a second SIGTERM while draining exits at once (code 1), killing every child group', { timeout: 40_000 }, async (t) => {
      const s = await serve(t, []);
      const base = `http://127.0.0.1:${s.port}`;
      await waitFor(async () => (await request(`${base}/readyz`)).status === 200, 10_000, 'ready');
      const sid = await rawSession(base, 'fix');
      const slow = post(`${base}/fix/mcp`, call('slow', { what: 'slow', ms: 30_000 }), sessionHeaders(sid)).catch((err: Error) => err);
      await waitFor(() => s.output().includes('slow started'), 5_000, 'the slow call running on the child');
      const pids = s.childPids();
      s.child.kill('SIGTERM');
      await waitFor(() => s.output().includes('SIGTERM: shutting down'), 5_000, 'the drain to begin');
      s.child.kill('SIGTERM');
      assert.deepEqual(await within(s.exited, 5_000, 'exit after the second SIGTERM'), { code: 1, signal: null });
      await assertAllGone(pids);
      await within(slow, 5_000, 'the slow call to end (its connection closes)');
    });

    it('SIGINT also exits 0 and stops the children', { timeout: 40_000 }, async (t) => {
      const s = await serve(t, []);
      const pids = s.childPids();
      s.child.kill('SIGINT');
      const exit = await within(s.exited, 15_000, 'exit after SIGINT');
      assert.deepEqual(exit, { code: 0, signal: null });
      await assertAllGone(pids);
    });

    /** Live processes whose parent is `pid` (Linux /proc). */
    function childrenOf(pid: number): number[] {
      const kids: number[] = [];
      for (const entry of fs.readdirSync('/proc')) {
        if (!/^\d+$/.test(entry)) continue;
        try {
          const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
          if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === pid) kids.push(Number(entry));
        } catch {
          // exited between readdir and read
        }
      }
      return kids;
    }

    it('config.example.json serves offline with --packages-dir (npx packages run from node_modules); healthcheck sees it', { timeout: 60_000 }, async (t) => {
      const port = await freePort();
      const memoryFile = path.join(tmpDir('mem'), 'memory.jsonl');
      const env = { ...cleanEnv(), MEMORY_FILE_PATH: memoryFile };
      const child = spawn(NODE, [DIST, '--config', path.join(HERE, 'config.example.json'), '--port', String(port), '--packages-dir', HERE], {
        cwd: HERE, env, stdio: ['ignore', 'pipe', 'pipe'],
      });
      let out = '';
      child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
      const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
      const groups = new Set<number>();
      t.after(async () => {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        await exited;
        await assertAllGone(groups);
      });
      const base = `http://127.0.0.1:${port}`;
      await waitFor(async () => (await request(`${base}/readyz`).catch(() => null))?.status === 200, 30_000, `ready (log: ${out.slice(-500)})`);
      for (const pid of childrenOf(child.pid!)) groups.add(pid);
      assert.equal(groups.size, 2, 'one child per configured server');
      const client = new Client({ name: 'cli-test', version: '1.0.0' });
      await client.connect(new StreamableHTTPClientTransport(new URL(`${base}/memory/mcp`)));
      await client.callTool({ name: 'create_entities', arguments: { entities: [{ name: 'ExampleEntity', entityType: 't', observations: [] }] } });
      assert.match(JSON.stringify(await client.callTool({ name: 'read_graph', arguments: {} })), /ExampleEntity/);
      await client.close();
      assert.match(fs.readFileSync(memoryFile, 'utf8'), /ExampleEntity/, '${MEMORY_FILE_PATH:-…} took the environment value');
      const hc = await run(['healthcheck', '--port', String(port)]);
      assert.equal(hc.code, 0, hc.stderr);
      child.kill('SIGTERM');
      assert.deepEqual(await within(exited, 15_000, 'exit after SIGTERM'), { code: 0, signal: null });
      await assertAllGone(groups);
      const down = await run(['healthcheck', '--port', String(port)]);
      assert.equal(down.code, 1, 'healthcheck fails when nothing answers');
    });

    it('secrets expanded into a child environment are masked when the child prints them to stderr', { timeout: 40_000 }, async (t) => {
      const secret = 'SECRET-VALUE-5e6f7a8b9c';
      const cfg = writeConfig({ mcpServers: { leaky: { command: NODE, args: ['-e', FIXTURE, 'stderr-env'], env: { API_KEY: '${RMP_TEST_API_KEY}' } } } });
      const port = await freePort();
      const child = spawn(NODE, [DIST, '--config', cfg, '--port', String(port), '--log-level', 'debug'], {
        cwd: HERE, env: { ...cleanEnv(), RMP_TEST_API_KEY: secret }, stdio: ['ignore', 'pipe', 'pipe'],
      });
      let out = '';
      child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
      const exited = new Promise<unknown>((resolve) => child.on('exit', resolve));
      const groups = new Set<number>();
      t.after(async () => {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        await exited;
        await assertAllGone(groups);
      });
      await waitFor(() => out.includes('my key is'), 15_000, 'the child stderr line in the log');
      for (const pid of childrenOf(child.pid!)) groups.add(pid);
      child.kill('SIGTERM');
      await within(exited, 15_000, 'exit');
      assert.ok(!out.includes(secret), `secret in log: ${out.split('\n').find((l) => l.includes(secret))}`);
    });

    it('tokens never appear in the log, even at debug level', { timeout: 40_000 }, async (t) => {
      const good = 'GOOD-TOKEN-9f8e7d6c5b4a';
      const bad = 'BAD-TOKEN-0a1b2c3d4e5f';
      const s = await serve(t, ['--token', good, '--log-level', 'debug']);
      const base = `http://127.0.0.1:${s.port}`;
      await waitFor(async () => (await request(`${base}/readyz`)).status === 200, 10_000, 'ready');
      assert.equal((await post(`${base}/fix/mcp`, initMsg(), { accept: 'application/json', authorization: `Bearer ${good}` })).status, 200);
      assert.equal((await post(`${base}/fix/mcp`, initMsg(), { accept: 'application/json', authorization: `Bearer ${bad}` })).status, 401);
      s.child.kill('SIGTERM');
      await within(s.exited, 15_000, 'exit');
      assert.ok(!s.output().includes(good), 'good token logged');
      assert.ok(!s.output().includes(bad), 'presented bad token logged');
    });

    /** Runs dist/proxy.js with `config` (extra node flags first); killed and leak-checked after the test. */
    async function launch(t: TestContext, config: unknown, args: string[] = [], env = cleanEnv(), nodeArgs: string[] = []) {
      const cfg = writeConfig(config);
      const port = await freePort();
      const child = spawn(NODE, [...nodeArgs, DIST, '--config', cfg, '--port', String(port), ...args], { cwd: HERE, env, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
      const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
      const groups = new Set<number>();
      const pids = new Set<number>();
      t.after(async () => {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        await exited;
        await assertAllGone(groups, pids);
      });
      const base = `http://127.0.0.1:${port}`;
      await waitFor(async () => child.exitCode !== null || (await request(`${base}/healthz`).catch(() => null))?.status === 200, 15_000, `listening (log: ${out.slice(-300)})`);
      return { child, port, base, exited, output: () => out, groups, pids };
    }

    // Regression: the proxy process exited 1 on a body nested 5,000 deep.
    it('serve: a body nested 5,000 deep is refused with 400 and the process keeps running', { timeout: 40_000 }, async (t) => {
      const pidFile = path.join(tmpDir('cli'), 'pids');
      const p = await launch(t, { mcpServers: { fix: { command: NODE, args: ['-e', FIXTURE], env: { FIXTURE_PIDFILE: pidFile } } } });
      await waitFor(async () => (await request(`${p.base}/readyz`)).status === 200, 10_000, 'ready');
      for (const pid of fileLines(pidFile)) p.groups.add(Number(pid));
      const sid = await rawSession(p.base, 'fix');
      const deep = nestedArrays(5_000);
      for (const body of [`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"do","arguments":{"deep":${deep}}}}`, `{"jsonrpc":"2.0","method":"notifications/x","params":{"deep":${deep}}}`]) {
        assertRpcError(await post(`${p.base}/fix/mcp`, body, sessionHeaders(sid)), 400, -32600);
      }
      assert.equal(p.child.exitCode, null, `the proxy exited: ${p.output().slice(-500)}`);
      assert.equal((await request(`${p.base}/healthz`)).status, 200);
    });

    // Regression: should the process still die, no child is left behind. Verified red on 19d7923 (no handler):
    // the child exits at the end of its stdin, its SIGTERM-ignoring grandchild is left running.
    it('serve: an uncaught exception kills every child group on the way out (a grandchild ignoring SIGTERM included)', { timeout: 40_000 }, async (t) => {
      const dir = tmpDir('cli');
      const pidFile = path.join(dir, 'pids');
      const inject = path.join(dir, 'inject.mjs');
      // SIGWINCH: a signal the proxy gives no meaning to, so only the injected throw can end the process.
      fs.writeFileSync(inject, "process.on('SIGWINCH', () => { throw new Error('injected uncaught exception'); });\n");
      const p = await launch(t, { mcpServers: { fix: { command: NODE, args: ['-e', FIXTURE], env: { FIXTURE_PIDFILE: pidFile } } } }, [], cleanEnv(), ['--import', pathToFileURL(inject).href]);
      await waitFor(async () => (await request(`${p.base}/readyz`)).status === 200, 10_000, 'ready');
      const [childPid] = fileLines(pidFile).map(Number);
      p.groups.add(childPid!);
      const client = new Client({ name: 'cli-test', version: '1.0.0' });
      await client.connect(new StreamableHTTPClientTransport(new URL(`${p.base}/fix/mcp`)));
      const gpid = Number(textOf(await client.callTool({ name: 'do', arguments: { what: 'grandchild', ignoreTerm: true } })));
      p.pids.add(gpid);
      await client.close();
      p.child.kill('SIGWINCH');
      const exit = await within(p.exited, 10_000, 'exit after the uncaught exception');
      assert.notEqual(exit.code, 0, JSON.stringify(exit));
      assert.match(p.output(), /injected uncaught exception/);
      await assertAllGone([childPid!], [gpid]);
    });

    // Regression: --token a and --token "" were accepted, also on a public bind.
    it('refuses tokens under 16 characters, "" included, from flags, the environment and token files (exit 2)', { timeout: 40_000 }, async () => {
      const cfg = writeConfig({ mcpServers: { f: { command: NODE, args: ['-e', FIXTURE] } } });
      const tokenFile = path.join(tmpDir('cli'), 'tokens');
      fs.writeFileSync(tokenFile, 'long-enough-token-0001\nshort\n');
      const port = String(await freePort());
      const cases: [string[], Record<string, string>][] = [
        [['--token', 'a'], {}],
        [['--token', ''], {}],
        [['--token', 'a', '--host', '0.0.0.0'], {}],
        [['--token', 'x'.repeat(15)], {}],
        [['--token-file', tokenFile], {}],
        [[], { MCP_PROXY_TOKEN: 'long-enough-token-0001,tiny' }],
      ];
      for (const [args, env] of cases) {
        const r = await run(['--config', cfg, '--port', port, ...args], { ...cleanEnv(), ...env });
        assert.equal(r.code, 2, `${args.join(' ')} ${JSON.stringify(env)}: ${r.stderr}`);
        assert.match(r.stderr, /16 characters/);
        assert.ok(!r.stderr.includes('x'.repeat(15)), 'the token is not printed');
      }
    });

    it('a token file over 64 KiB is refused naming the limit', { timeout: 20_000 }, async () => {
      const tokenFile = path.join(tmpDir('cli'), 'tokens');
      fs.writeFileSync(tokenFile, ('t'.repeat(31) + '\n').repeat(2049)); // 65,536 + 32 bytes
      const r = parseCli(['--token-file', tokenFile], {});
      assert.ok('error' in r, JSON.stringify(r).slice(0, 200));
      assert.match(r.error, /^--token-file: .*larger than 65536 bytes/);
    });

    it('check: ${file:/dev/zero} and a FIFO with no writer are refused at once ("not a regular file"), exit 1', { timeout: 30_000 }, async () => {
      // A FIFO blocked open() until a writer came: at start-up, and at a reload, with every request stalled behind it.
      const fifo = path.join(tmpDir('fifo'), 'secret');
      childProcess.execFileSync('mkfifo', [fifo]);
      const cfg = writeConfig({ mcpServers: { z: { command: NODE, env: { K: '${file:/dev/zero}', F: `\${file:${fifo}}` } } } });
      const started = Date.now();
      const r = await run(['check', '--config', cfg], cleanEnv(), 15_000);
      assert.equal(r.code, 1, `${r.signal ?? ''} ${r.stderr}`);
      assert.match(r.stderr, /mcpServers\.z\.env\.K: cannot read secret file "\/dev\/zero" \(not a regular file\)/);
      assert.match(r.stderr, /mcpServers\.z\.env\.F: cannot read secret file ".*secret" \(not a regular file\)/);
      assert.ok(Date.now() - started < 10_000);
    });

    // Regression: `check` reports what would make every spawn fail.
    it('check: a cwd that does not exist or is a file, and a NUL in an argument, exit 1 naming the field', { timeout: 30_000 }, async () => {
      const dir = tmpDir('cli');
      const file = path.join(dir, 'a-file');
      fs.writeFileSync(file, '');
      const cases: [Json, RegExp][] = [
        [{ command: NODE, cwd: path.join(dir, 'missing') }, /mcpServers\.s\.cwd/],
        [{ command: NODE, cwd: file }, /mcpServers\.s\.cwd/],
        [{ command: NODE, args: ['-e', '0', 'a\u0000b'] }, /mcpServers\.s\.args\[2\].*contains a NUL character/],
      ];
      for (const [entry, expected] of cases) {
        const r = await run(['check', '--config', writeConfig({ mcpServers: { s: entry } })]);
        assert.equal(r.code, 1, `${JSON.stringify(entry)}: ${r.stdout}${r.stderr}`);
        assert.match(r.stderr, expected);
        assert.doesNotMatch(r.stdout, /config OK/);
      }
      const ok = await run(['check', '--config', writeConfig({ mcpServers: { s: { command: NODE, cwd: dir } } })]);
      assert.equal(ok.code, 0, ok.stderr);
    });

    // What an operator reads in the log of dist/proxy.js at debug level.
    describe('log hygiene at --log-level debug', () => {
      const token = 'static-token-LEAKCHECK-0001';
      const pemLines = ['-----BEGIN TEST KEY-----', 'MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu', 'KUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQ', '-----END TEST KEY-----'];
      const pin = 'q7z';
      const stray = 'stray-id-secret-8181';
      const quoted = 'pa"ss\\word-9876';
      let out = '';
      let child: ChildProcess | null = null;
      let exited: Promise<unknown> = Promise.resolve();
      const pids: number[] = [];
      before(async () => {
        const dir = tmpDir('leak');
        const pem = path.join(dir, 'key.pem');
        fs.writeFileSync(pem, pemLines.join('\n') + '\n');
        const quotedFile = path.join(dir, 'quoted');
        fs.writeFileSync(quotedFile, quoted);
        const pidFile = path.join(dir, 'pids');
        const cfg = writeConfig({
          mcpServers: {
            leaky: { command: NODE, args: ['-e', FIXTURE, 'leak'], env: { FIXTURE_PIDFILE: pidFile, PEM: `\${file:${pem}}`, PIN: '${PIN_VAR}', STRAY: '${STRAY_VAR}', TOKEN_TEXT: token } },
            badinit: { command: NODE, args: ['-e', FIXTURE, 'initerror'], env: { FIXTURE_PIDFILE: pidFile, API_KEY: `\${file:${quotedFile}}` } },
          },
        });
        const port = await freePort();
        child = spawn(NODE, [DIST, '--config', cfg, '--port', String(port), '--log-level', 'debug', '--token', token], {
          cwd: HERE, env: { ...cleanEnv(), PIN_VAR: pin, STRAY_VAR: stray }, stdio: ['ignore', 'pipe', 'pipe'],
        });
        child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
        child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
        exited = new Promise((resolve) => child!.on('exit', resolve));
        await waitFor(() => out.includes('END-STDERR-MARKER') && out.includes('END-STDOUT-MARKER'), 15_000, `the leak fixture's output in the log (log: ${out.slice(-400)})`);
        await waitFor(() => /\[badinit\].*initialize failed/.test(out), 15_000, 'the failed initialize logged');
        for (const line of fileLines(pidFile)) pids.push(Number(line));
        child.kill('SIGTERM');
        await within(exited, 15_000, 'exit');
      });
      after(async () => {
        if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        await exited;
        await assertAllGone(pids);
      });
      const linesWith = (needle: string) => out.split('\n').filter((l) => l.includes(needle));

      it('every line of a multi-line ${file:} secret (a PEM) is masked', () => {
        for (const line of pemLines) assert.deepEqual(linesWith(line), [], `PEM line ${line.slice(0, 20)}…`);
        assert.ok(linesWith('stderr: ***').length >= pemLines.length, 'each PEM line logged as ***');
      });

      it('a secret holding " and \\ is masked in its JSON-escaped form (the failed initialize answer)', () => {
        assert.deepEqual(linesWith('word-9876'), []);
        assert.ok(linesWith('initialize failed').every((l) => l.includes('***')), linesWith('initialize failed').join('\n'));
      });

      it('a secret under 4 characters is masked where it stands alone, not inside a word', () => {
        assert.equal(linesWith(`pin=${pin}.`).length, 0);
        assert.ok(linesWith('pin=***.').length === 1, 'pin=***.');
        assert.ok(linesWith(`keep abc${pin}def`).length === 1, 'not masked inside a word');
      });

      it('a secret in a debug line ("dropped a response … (id …)") and a static token are masked', () => {
        assert.deepEqual(linesWith(stray), []);
        assert.deepEqual(linesWith(token), []);
        assert.ok(linesWith('token *** here').length === 1, 'the token in child output masked');
      });

      it('control characters from a child are escaped as \\xNN: no raw CR, ESC, DEL or C1 reaches the log, so no line can be forged', () => {
        assert.doesNotMatch(out, /[\r\u001b\u007f\u0080-\u009f]/);
        const forged = linesWith('FORGED');
        assert.equal(forged.length, 1, forged.join('\n'));
        assert.match(forged[0]!, /forged\\x0d2099-01-01T00:00:00\.000Z error \[other\] FORGED \\x1b\[2K\\x85\\x7f end/i);
        assert.ok(!out.split('\n').some((l) => l.startsWith('2099-01-01')), 'a forged line start');
      });
    });

    /** dist/proxy.js on a config of `servers` in its own directory, killed (and its children checked gone) after the test. */
    async function spawnDist(t: TestContext, prefix: string, servers: (pidFile: string) => Record<string, unknown>, args: string[] = []) {
      const dir = tmpDir(prefix);
      const pidFile = path.join(dir, 'pids');
      const cfg = path.join(dir, 'config.json');
      fs.writeFileSync(cfg, JSON.stringify({ mcpServers: servers(pidFile) }));
      const port = await freePort();
      const child: ChildProcess = spawn(NODE, [DIST, '--config', cfg, '--port', String(port), ...args], { cwd: dir, env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
      const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, sig) => resolve({ code, signal: sig })));
      const pids = () => fileLines(pidFile).map(Number);
      onCleanup(t, async () => {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        await exited;
        await assertAllGone(pids());
      });
      await waitFor(() => out.includes('listening on') && pids().length > 0, 10_000, `start-up (${out})`);
      await waitFor(async () => (await request(`http://127.0.0.1:${port}/readyz`)).status === 200, 10_000, 'ready');
      return { child, cfg, port, exited, pids, output: () => out };
    }

    // F8. dist/proxy.js died on SIGHUP, SIGQUIT and SIGUSR2 without stopping its children (they lead their own groups).
    // SIGHUP now reloads the config (the next test).
    it('F8 dist/proxy.js on SIGQUIT and SIGUSR2 logs "SIGNAL: shutting down", exits 0 and leaves no child (one that ignores stdin EOF)', { timeout: 30_000 }, async (t) => {
      const run = async (signal: NodeJS.Signals) => {
        const { child, exited, pids, output } = await spawnDist(t, 'f8', (pidFile) => ({ fix: { command: NODE, args: ['-e', REVIEW_FIXTURE, 'noeof'], env: { FIXTURE_PIDFILE: pidFile } } }));
        child.kill(signal);
        const exit = await within(exited, 10_000, `exit after ${signal}`);
        assert.deepEqual(exit, { code: 0, signal: null }, `${signal}: ${output()}`);
        assert.match(output(), new RegExp(`info  \\[proxy\\] ${signal}: shutting down`));
        // The child ignores EOF, so only the proxy's TERM stops it: it is gone by the time the proxy has exited.
        assert.deepEqual(pids().filter(pidAlive), [], `${signal}: children left running`);
      };
      // allSettled: each run reaches its own end (pid file written) before any after hook kills and checks it.
      const outcomes = await Promise.allSettled((['SIGQUIT', 'SIGUSR2'] as const).map(run));
      for (const o of outcomes) if (o.status === 'rejected') throw o.reason;
    });

    it('SIGHUP reloads the config (here with --no-watch, so only the signal can): the added server answers, the running one keeps its child; the proxy keeps running', { timeout: 30_000 }, async (t) => {
      let entry: Record<string, unknown> = {};
      const { child, cfg, port, exited, pids, output } = await spawnDist(t, 'sighup', (pidFile) => {
        entry = { command: NODE, args: ['-e', FIXTURE], env: { FIXTURE_PIDFILE: pidFile } };
        return { one: entry };
      }, ['--no-watch']);
      const first = pids();
      fs.writeFileSync(cfg, JSON.stringify({ mcpServers: { one: entry, two: entry } }));
      // Not watched (--no-watch): only the signal reloads; without a SIGHUP handler the signal would end the process.
      child.kill('SIGHUP');
      await waitFor(() => output().includes('[two] serving at'), 10_000, `the reload (${output()})`);
      const out = output();
      assert.match(out, /info {2}\[config\] SIGHUP: reloading the config/);
      assert.match(out, /info {2}\[config\] reloaded .*config\.json: started "two"; 1 unchanged/);
      assert.match(out, new RegExp(`info {2}\\[two\\] serving at http://127\\.0\\.0\\.1:${port}/two/mcp`));
      const init = { jsonrpc: '2.0', id: 1, method: 'initialize', params: { protocolVersion: '2025-11-25', capabilities: {}, clientInfo: { name: 't', version: '1' } } };
      await waitFor(async () => (await post(`http://127.0.0.1:${port}/two/mcp`, init)).status === 200, 10_000, 'two answers');
      assert.deepEqual(pids().slice(0, first.length), first);
      assert.ok(first.every(pidAlive), 'the first server kept its child');
      assert.equal(child.exitCode, null, 'the proxy is still running');
      assert.equal(output().split('reloaded').length, 2, output());
      child.kill('SIGTERM');
      assert.deepEqual(await within(exited, 10_000, 'exit after SIGTERM'), { code: 0, signal: null });
    });

    it('--audit-log through dist/proxy.js: SIGUSR1 reopens the file after logrotate moved it (the old file keeps what came before)', { timeout: 30_000 }, async (t) => {
      const dir = tmpDir('audit-cli');
      const file = path.join(dir, 'audit.log');
      const { child, port, output } = await spawnDist(t, 'audit', (pidFile) => ({ fix: { command: NODE, args: ['-e', FIXTURE], env: { FIXTURE_PIDFILE: pidFile } } }), ['--audit-log', file]);
      const base = `http://127.0.0.1:${port}`;
      const sid = await rawSession(base, 'fix');
      assert.equal(answerText(await post(`${base}/fix/mcp`, call(1, { what: 'echo', text: 'one' }), sessionHeaders(sid))), 'one');
      fs.renameSync(file, `${file}.1`);
      child.kill('SIGUSR1');
      await waitFor(() => output().includes('reopened'), 5_000, `the reopen (${output()})`);
      assert.equal(child.exitCode, null, 'SIGUSR1 did not stop the proxy');
      assert.equal(answerText(await post(`${base}/fix/mcp`, call(2, { what: 'echo', text: 'two' }), sessionHeaders(sid))), 'two');
      const events = (f: string) => fileLines(f).map((line) => JSON.parse(line).event);
      assert.deepEqual(events(`${file}.1`), ['session_open', 'tool_call']);
      assert.deepEqual(events(file), ['tool_call']);
    });

    // F12. A token with a space could never be sent; loopback binds other than 127.0.0.1 refused their own Origin;
    // a low descriptor limit capped connections silently.
    it('F12 a token with a space → WEAK_TOKEN (CLI: exit 2); bound to 127.0.0.2 without tokens, Origin http://127.0.0.2:PORT → 200; under a 400-descriptor limit dist/proxy.js warns "file-descriptor limit"', { timeout: 30_000 }, async (t) => {
      const spaced = 'has a space 0123456789';
      const WHY = '1 of 1 bearer tokens hold spaces or characters outside visible ASCII, so no client could send them';
      const err = await startProxy({ servers: [] }, { host: '127.0.0.1', port: 0, logLevel: 'error', tokens: [spaced] }).then(
        async (proxy) => (await proxy.close(), 'started'),
        (e: unknown) => e as ProxyError,
      );
      assert.ok(err instanceof ProxyError, `a token with a space: ${String(err)}`);
      assert.equal(err.code, 'WEAK_TOKEN');
      assert.equal(err.message, WHY);
      assert.deepEqual(parseCli(['--token', spaced], {}), { error: `--token: ${WHY}` });
      const dir = tmpDir('f12');
      const pidFile = path.join(dir, 'pids');
      const cfg = path.join(dir, 'config.json');
      fs.writeFileSync(cfg, JSON.stringify({ mcpServers: { fix: { command: NODE, args: ['-e', REVIEW_FIXTURE, 'ok'], env: { FIXTURE_PIDFILE: pidFile } } } }));
      const cli = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
        execFile(NODE, [DIST, '--config', cfg, '--port', '0', '--token', spaced], { cwd: dir, env: cleanEnv(), timeout: 5_000 }, (e, _stdout, stderr) =>
          resolve({ code: e ? ((e as { code?: number }).code ?? null) : 0, stderr }));
      });
      await assertAllGone(fileLines(pidFile).map(Number));
      assert.equal(cli.code, 2, cli.stderr);
      assert.equal(cli.stderr, `remote-mcp-proxy: --token: ${WHY}\nRun with --help for usage.\n`);

      // Loopback bind other than 127.0.0.1, no tokens: its own origin is a loopback one.
      const f = reviewFiles('f12');
      const h = await reviewHarness(t, { servers: [reviewFixture('fix', 'ok', { FIXTURE_PIDFILE: f.pidFile })] }, { host: '127.0.0.2', limits: FAST }, f.pidFile);
      await h.proxy.ready(10_000);
      const own = `http://127.0.0.2:${h.proxy.port}`;
      const res = await post(`${own}/fix/mcp`, initMsg(), { accept: 'application/json', origin: own });
      assert.equal(res.status, 200, res.text);
      assert.equal(JSON.parse(res.text).result.serverInfo !== undefined, true);
      const evil = await post(`${own}/fix/mcp`, initMsg(), { accept: 'application/json', origin: 'http://evil.example' });
      assert.equal(evil.status, 403);
      assert.deepEqual(JSON.parse(evil.text), { jsonrpc: '2.0', error: { code: -32000, message: 'Forbidden: Origin not allowed' }, id: null });

      // A low descriptor limit (prlimit) leaves room for one connection: said at start.
      const port = await freePort();
      const low = spawn('prlimit', ['--nofile=400:400', NODE, DIST, '--config', cfg, '--port', String(port)], { cwd: dir, env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      low.stdout!.on('data', (d: Buffer) => (out += d.toString()));
      low.stderr!.on('data', (d: Buffer) => (out += d.toString()));
      const exited = new Promise<number | null>((resolve) => low.on('exit', (code) => resolve(code)));
      onCleanup(t, async () => {
        if (low.exitCode === null && low.signalCode === null) low.kill('SIGKILL');
        await exited;
        await assertAllGone(fileLines(pidFile).map(Number));
      });
      await waitFor(() => out.includes('listening on') || low.exitCode !== null, 10_000, `start-up under prlimit (${out})`);
      assert.match(out, /warn  \[proxy\] only 1 client connections fit under this process's file-descriptor limit; raise it \(ulimit -n\)\n/);
      // Signal handlers are installed just after "listening on" is written: an answer means they are in place.
      assert.equal((await request(`http://127.0.0.1:${port}/healthz`)).status, 200);
      low.kill('SIGTERM');
      assert.equal(await within(exited, 10_000, 'exit after SIGTERM'), 0);
    });
  });
});

// ── Properties: message parsing and id/progress-token rewriting (fast-check) ────────────────────────────

describe('Properties: message parsing and id/progress-token rewriting (fast-check)', () => {
  /** Fixed, so a failure replays; the report prints it with the shrunk counterexample. */
  const FC_SEED = process.env.FC_SEED === undefined ? 0x5eed_0008 : Number(process.env.FC_SEED);

  /** fc.assert with the fixed seed; the time limit stops a long shrink (the failure found so far is reported). */
  type RunParams = { seed: number; numRuns: number; interruptAfterTimeLimit: number; includeErrorInReport: boolean };
  async function holds(what: string, run: (params: RunParams) => void | Promise<void>, numRuns: number, timeLimitMs = 15_000): Promise<void> {
    try {
      await run({ seed: FC_SEED, numRuns, interruptAfterTimeLimit: timeLimitMs, includeErrorInReport: true });
    } catch (err) {
      const e = err as Error;
      e.message = `property "${what}" failed with fast-check seed ${FC_SEED} (replay: FC_SEED=${FC_SEED})\n${e.message}`;
      throw e;
    }
  }

  // A tiny stdio MCP server. tools/call (any name) answers {args, id, token}: its arguments and the id and
  // progress token it received. With a token it first sends arguments.progress notifications/progress for
  // that token (message: arguments.tag), spread over arguments.delayMs, then the answer at about delayMs.
  // arguments.raw: an array of lines written to stdout as they are, "@ID@" and "@TOKEN@" replaced by the JSON
  // of the id and token the child received, "@IDM1@" by that id minus one (for child lines the proxy must cope
  // with: CR, depth, layouts, decoys).
  const ECHO = String.raw`
'use strict';
const send = (m) => process.stdout.write(JSON.stringify(m) + '\n');
${STDIN_LINES}
process.stdin.on('end', () => process.exit(0));
function onMessage(msg) {
  if (msg.id === undefined || typeof msg.method !== 'string') return;
  if (msg.method === 'initialize') {
    const v = msg.params && typeof msg.params.protocolVersion === 'string' ? msg.params.protocolVersion : '2025-06-18';
    return send({ jsonrpc: '2.0', id: msg.id, result: { protocolVersion: v, capabilities: { tools: {} }, serverInfo: { name: 'echo', version: '1.0.0' } } });
  }
  if (msg.method === 'ping') return send({ jsonrpc: '2.0', id: msg.id, result: {} });
  if (msg.method !== 'tools/call') return send({ jsonrpc: '2.0', id: msg.id, error: { code: -32601, message: 'Method not found' } });
  const p = msg.params && typeof msg.params === 'object' ? msg.params : {};
  const a = p.arguments && typeof p.arguments === 'object' && !Array.isArray(p.arguments) ? p.arguments : {};
  const meta = p._meta && typeof p._meta === 'object' ? p._meta : {};
  const token = meta.progressToken;
  if (Array.isArray(a.raw)) {
    const idText = JSON.stringify(msg.id);
    const tokenText = JSON.stringify(token === undefined ? null : token);
    const before = JSON.stringify(typeof msg.id === 'number' ? msg.id - 1 : null); // the id of the request before
    process.stdout.write(a.raw.map((l) => String(l).split('@ID@').join(idText).split('@TOKEN@').join(tokenText).split('@IDM1@').join(before) + '\n').join(''));
    return;
  }
  const steps = Math.min(Math.max(Math.floor(Number(a.progress)) || 0, 0), 10);
  const delay = Math.min(Math.max(Math.floor(Number(a.delayMs)) || 0, 0), 1000);
  const at = (ms, f) => (ms > 0 ? setTimeout(f, ms) : f());
  // One timer at a time, each set by the one before: timers of different durations set together may fire out
  // of order in Node (seen: progress 2 before 1), and the order of a request's messages is part of what is checked.
  const n = token === undefined ? 0 : steps;
  const gap = Math.floor(delay / (n + 1));
  let i = 0;
  const step = () => {
    if (i < n) {
      i++;
      send({ jsonrpc: '2.0', method: 'notifications/progress', params: { progressToken: token, progress: i, total: n, message: String(a.tag) } });
      return at(gap, step);
    }
    send({ jsonrpc: '2.0', id: msg.id, result: { content: [{ type: 'text',
      text: JSON.stringify({ args: a, id: msg.id, token: token === undefined ? null : token }) }] } });
  };
  at(n === 0 ? delay : gap, step);
}
`;
  const echoServer = (name = 'echo'): ServerConfig => srv(name, ['-e', ECHO]);

  /** What the echo child said it received, from a tools/call answer. */
  const echoed = (msg: Json): { args: Json; id: unknown; token: unknown } => JSON.parse(msg.result.content[0].text);

  /** Nesting depth of a JSON text (containers on the deepest path; a scalar is 0), by a scan that skips strings. */
  function jsonDepth(text: string): number {
    let depth = 0;
    let max = 0;
    let inString = false;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (inString) {
        if (c === 0x5c) i++;
        else if (c === 0x22) inString = false;
      } else if (c === 0x22) inString = true;
      else if (c === 0x5b || c === 0x7b) max = Math.max(max, ++depth);
      else if (c === 0x5d || c === 0x7d) depth--;
    }
    return max;
  }

  /** A proxy with the echo child, and a Streamable and a legacy session on it. */
  async function echoProxy(t: TestContext, options: StartOptions): Promise<{ h: Harness; mcpUrl: string; sid: string; legacy: Legacy }> {
    const h = await harness(t, { servers: [echoServer()] }, options);
    await h.proxy.ready(10_000);
    const sid = await rawSession(h.url, 'echo');
    const legacy = await legacySession(h.url, 'echo');
    t.after(() => legacy.stream.close());
    return { h, mcpUrl: `${h.url}/echo/mcp`, sid, legacy };
  }

  /** A legacy HTTP+SSE session, initialized over raw HTTP: its stream and its POST endpoint. */
  type Legacy = { stream: SseStream; postUrl: string };
  async function legacySession(base: string, name: string): Promise<Legacy> {
    const stream = await openSse(`${base}/${name}/sse`);
    const endpoint = await stream.next((e) => e.event === 'endpoint', 5_000, 'endpoint event');
    const postUrl = new URL(endpoint.data, base).href;
    const init = await post(postUrl, initMsg('init'));
    assert.equal(init.status, 202, init.text);
    await stream.next((e) => e.event === 'message' && JSON.parse(e.data).id === 'init', 5_000, 'initialize answer on the stream');
    const note = await post(postUrl, { jsonrpc: '2.0', method: 'notifications/initialized' });
    assert.equal(note.status, 202, note.text);
    return { stream, postUrl };
  }

  /** JSON-RPC messages a stream has carried (message events only), from event index `from`. */
  const streamMessages = (stream: SseStream, from = 0): Json[] =>
    stream.events.slice(from).filter((e) => e.event === 'message').map((e) => JSON.parse(e.data));

  /** A 4xx whose body is a JSON-RPC error (code a negative integer, message a string); returns the body. */
  function assertRpcClientError(res: RawResponse, what: string): Json {
    assert.ok(res.status >= 400 && res.status < 500, `${what}: status ${res.status} is 4xx (body ${res.text.slice(0, 300)})`);
    let body: Json;
    try {
      body = JSON.parse(res.text);
    } catch {
      assert.fail(`${what}: ${res.status} body is not JSON: ${res.text.slice(0, 300)}`);
    }
    assert.equal(body.jsonrpc, '2.0', `${what}: jsonrpc (body ${res.text.slice(0, 300)})`);
    assert.ok(Number.isInteger(body.error?.code) && body.error.code < 0, `${what}: error.code (body ${res.text.slice(0, 300)})`);
    assert.equal(typeof body.error.message, 'string', `${what}: error.message`);
    return body;
  }

  const toolCall = (idText: string, args: Json, tokenText?: string): string =>
    `{"jsonrpc":"2.0","id":${idText},"method":"tools/call","params":{"name":"echo","arguments":${JSON.stringify(args)}` +
    `${tokenText === undefined ? '' : `,"_meta":{"progressToken":${tokenText}}`}}}`;

  // Ids and progress tokens of every JSON type, as the JSON text the client sends (so huge literals and odd
  // spellings reach the proxy as written). Valid ids are strings and finite numbers: the answer must carry the
  // value JSON.parse gives the text (1.0 → 1, 1e-400 → 0, 123456789012345678901234567890 → its double).
  const stringIdText = fc
    .oneof(
      fc.string({ unit: 'binary', maxLength: 12 }), // any code point, lone surrogates included
      fc.string({ unit: 'grapheme', maxLength: 6 }),
      fc.constantFrom('', ' ', '"', '\\', '\\"', '\u0000', '\n\r\t', '\u2028\u2029', '\ud800', '\udfff', '😀', 'proxy-1', '0', '1', 'null', '{"a":1}'),
    )
    .map((s) => JSON.stringify(s));
  const numberIdText = fc.oneof(
    fc.integer().map(String),
    fc.maxSafeInteger().map(String),
    fc.bigInt({ min: -(10n ** 40n), max: 10n ** 40n }).map(String),
    fc.double({ noNaN: true, noDefaultInfinity: true }).map((d) => JSON.stringify(d)),
    fc.constantFrom('0', '-0', '1', '-1', '0.5', '1.0', '2.50', '-1.5e-3', '1e21', '1E+300', '9007199254740993',
      '123456789012345678901234567890', '1.7976931348623157e308', '5e-324', '-5e-324', '1e-400'),
  );
  const validIdText = fc.oneof(stringIdText, numberIdText);
  // Invalid: null, booleans, objects, arrays, and numbers JSON.parse turns into ±Infinity (no JSON can echo them).
  const invalidIdText = fc.oneof(
    fc.constantFrom('null', 'true', 'false', '{}', '[]', '1e400', '-1e400'),
    fc.object({ maxDepth: 2 }).map((o) => JSON.stringify(o)),
    fc.array(fc.jsonValue({ maxDepth: 2 }), { maxLength: 3 }).map((a) => JSON.stringify(a)),
  );

  // ── Pure: line framing ──

  it('createLineFramer(): any chunking of any lines yields exactly those lines; each oversized one is reported once with its length and first bytes', async () => {
    const lineBytes = fc.oneof(
      fc.uint8Array({ maxLength: 40 }).map((b) => Buffer.from(b.filter((x) => x !== 0x0a))),
      fc.string({ unit: 'grapheme', maxLength: 12 }).map((s) => Buffer.from(s.replace(/\n/g, ''))),
      fc.string({ unit: 'grapheme-ascii', maxLength: 40 }).map((s) => Buffer.from(s.replace(/\n/g, '') + '\r')),
      fc.constantFrom(Buffer.alloc(0), Buffer.from('\r'), Buffer.from('\r\r')),
    );
    await holds('line framer', (params) => fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 24 }),
        fc.array(lineBytes, { maxLength: 12 }),
        fc.boolean(),
        fc.array(fc.nat({ max: 1_000 }), { maxLength: 20 }),
        fc.integer({ min: 1, max: 30 }),
        (max, lines, trailingNewline, cuts, headSeed) => {
          const headBytes = 1 + (headSeed % (max + 1)); // 1 … max + 1: the head is then exactly determined
          const stream = Buffer.concat(lines.flatMap((l, i) => (i < lines.length - 1 || trailingNewline ? [l, Buffer.from('\n')] : [l])));
          const points = [...new Set(cuts.map((c) => c % (stream.length + 1)))].sort((a, b) => a - b);
          const got: (string | { bytes: number; head: string })[] = [];
          const raws: Buffer[] = [];
          const f = createLineFramer(max, (line, raw) => {
            assert.equal(line, raw.toString('utf8'), 'line is its raw bytes decoded');
            got.push(line);
            raws.push(Buffer.from(raw));
          }, (bytes, head) => got.push({ bytes, head }), headBytes);
          let at = 0;
          for (const p of [...points, stream.length]) {
            f.push(stream.subarray(at, p));
            at = p;
          }
          f.end();
          // Model: one trailing \r is stripped; over max bytes → one report (length as written, first bytes);
          // empty → nothing; else the line.
          const want: (string | { bytes: number; head: string })[] = [];
          const wantRaw: Buffer[] = [];
          for (const l of lines) {
            const content = l[l.length - 1] === 0x0d ? l.subarray(0, l.length - 1) : l;
            if (content.length > max) want.push({ bytes: l.length, head: l.subarray(0, headBytes).toString('utf8') });
            else if (content.length > 0) {
              want.push(content.toString('utf8'));
              wantRaw.push(content);
            }
          }
          assert.deepEqual(got, want);
          assert.deepEqual(raws, wantRaw, 'raw bytes of each line');
        },
      ),
      params,
    ), 1_000, 5_000);
  });

  it('jsonDepthExceeds() agrees with a reference depth count for any JSON text, brackets and escapes inside strings included', async () => {
    const tricky = fc.constantFrom('[', ']', '{', '}', '\\', '"', '\\"', '[[[[', '"]}');
    const value = fc.jsonValue({ maxDepth: 6 }).chain((v) => fc.tuple(fc.constant(v), fc.array(fc.tuple(tricky, fc.string({ maxLength: 3 })), { maxLength: 3 })));
    await holds('jsonDepthExceeds', (params) => fc.assert(
      fc.property(value, fc.integer({ min: 1, max: 10 }), fc.integer({ min: 0, max: 12 }), ([v, strings], max, wrap) => {
        // Strings full of brackets and escapes, next to a value of random depth, inside `wrap` more arrays.
        const text = '['.repeat(wrap) + JSON.stringify([v, ...strings.map(([a, b]) => a + b)]) + ']'.repeat(wrap);
        assert.equal(jsonDepthExceeds(text, max), jsonDepth(text) > max, `depth ${jsonDepth(text)}, max ${max}: ${text.slice(0, 200)}`);
      }),
      params,
    ), 2_000, 5_000);
  });

  describe('createIdScanner(), fed any JSON object in any chunks', () => {
    // Keys that are not "id" but are spelled with escapes whose letters are i and d, or look like it otherwise.
    const DECOY_KEYS = ['i\nd', '"id', 'i"d', 'i\\d', '\\id', 'id\\', 'i\u0000d', 'ID', 'idx', 'xid', ' id', 'id ', 'iд'];
    const decoyValue = fc.oneof(
      fc.jsonValue({ maxDepth: 3 }),
      fc.integer({ min: -5, max: 1_000 }), // what the scanner would take for a child id
      fc.integer().map((n) => ({ id: n })), // a nested "id": not the top-level one
      fc.integer().map((n) => `"id":${n}`), // an "id" inside a string
      fc.integer().map((n) => [{ id: n }]),
    );
    const idValue = fc.oneof(
      { weight: 4, arbitrary: fc.integer({ min: -1_000_000, max: 1_000_000_000 }).map((n) => ({ text: String(n), plain: true })) },
      { weight: 1, arbitrary: fc.constantFrom('5.0', '5e0', '1E2', '"7"', 'null', 'true', '{"id":3}', '[4]', '-0').map((text) => ({ text, plain: text === '-0' })) },
    );
    const member = fc.record({ key: fc.oneof(fc.constantFrom(...DECOY_KEYS), fc.string({ maxLength: 4 })), value: decoyValue });
    const objectText = fc.tuple(
      fc.uniqueArray(member, { maxLength: 6, selector: (m) => m.key }).map((ms) => ms.filter((m) => m.key !== 'id')),
      fc.option(fc.record({ value: idValue, at: fc.nat(), escapedKey: fc.boolean() }), { freq: 5 }),
      fc.integer(),
      fc.array(fc.nat({ max: 10_000 }), { maxLength: 8 }),
    ).map(([members, idMember, seed, cuts]) => {
      const ws = whitespace(seed, false);
      const parts = members.map((m) => `${JSON.stringify(m.key)}${ws()}:${ws()}${JSON.stringify(m.value)}`);
      if (idMember) {
        const key = idMember.escapedKey ? '"\\u0069\\u0064"' : '"id"'; // "\u0069\u0064" is "id" too
        parts.splice(idMember.at % (parts.length + 1), 0, `${key}${ws()}:${ws()}${idMember.value.text}`);
      }
      const text = `${ws()}{${ws()}${parts.join(`${ws()},${ws()}`)}${ws()}}${ws()}`;
      return { text, plainId: idMember !== null && idMember.value.plain && !idMember.escapedKey, cuts };
    });
    const scan = (text: string, cuts: number[]): number | undefined => {
      const bytes = Buffer.from(text);
      const scanner = createIdScanner();
      let at = 0;
      for (const p of [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b).concat(bytes.length)) {
        scanner.feed(bytes.subarray(at, p));
        at = p;
      }
      return scanner.id();
    };

    it('never reports an id other than the one JSON.parse sees', async () => {
      await holds('createIdScanner: never a wrong id', (params) => fc.assert(
        fc.property(objectText, ({ text, cuts }) => {
          const got = scan(text, cuts);
          const parsed = JSON.parse(text).id;
          if (got !== undefined) assert.ok(Object.is(got, parsed), `scanner says id ${got}, JSON.parse says ${JSON.stringify(parsed)}: ${JSON.stringify(text)}`);
        }),
        params,
      ), 3_000, 5_000);
    });

    it('finds a top-level "id" written as a plain integer, whatever other keys and values surround it', async () => {
      await holds('createIdScanner: finds a plain id', (params) => fc.assert(
        fc.property(objectText, ({ text, plainId, cuts }) => {
          fc.pre(plainId);
          const parsed = JSON.parse(text).id;
          assert.ok(Object.is(scan(text, cuts), parsed), `a plain integer id ${parsed} is found in ${JSON.stringify(text)}`);
        }),
        params,
      ), 1_000, 5_000);
    });
  });

  // ── Ids of every JSON type ──

  it('ids and progress tokens of every JSON type come back unchanged on both transports; null, boolean, object, array and overflowing ids → 400 -32600', { timeout: 60_000 }, async (t) => {
    const h = await harness(t, { servers: [echoServer()] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const mcpUrl = `${h.url}/echo/mcp`;
    const sid = await rawSession(h.url, 'echo');
    // JSON-only POSTs have no stream of their own: their progress goes to the session's GET stream.
    const getStream = await openSse(mcpUrl, { 'mcp-session-id': sid });
    const legacy = await legacySession(h.url, 'echo');
    t.after(() => {
      getStream.close();
      legacy.stream.close();
    });
    let n = 0;
    await holds('ids of every JSON type', (params) => fc.assert(
      fc.asyncProperty(
        fc.constantFrom('mcp-json', 'mcp-sse', 'legacy'),
        fc.oneof({ weight: 3, arbitrary: validIdText.map((text) => ({ valid: true, text })) },
          { weight: 1, arbitrary: invalidIdText.map((text) => ({ valid: false, text })) }),
        fc.option(validIdText),
        fc.integer({ min: 0, max: 3 }),
        async (transport, id, tokenText, steps) => {
          const tag = `ids-${n++}`;
          const body = toolCall(id.text, { tag, progress: steps }, tokenText ?? undefined);
          const getFrom = getStream.events.length;
          const legacyFrom = legacy.stream.events.length;
          const res = await within(transport === 'legacy'
            ? post(legacy.postUrl, body)
            : post(mcpUrl, body, sessionHeaders(sid, { accept: transport === 'mcp-json' ? 'application/json' : 'application/json, text/event-stream' })),
          5_000, `POST ${tag}`);
          if (!id.valid) {
            const err = assertRpcClientError(res, `invalid id ${id.text}`);
            assert.equal(res.status, 400, `invalid id ${id.text}: status`);
            assert.equal(err.error.code, -32600, `invalid id ${id.text}: code`);
            assert.equal(err.id, null, 'an invalid id is not echoed');
            return;
          }
          const wantId = JSON.parse(id.text);
          const wantToken = tokenText === null ? undefined : JSON.parse(tokenText);
          let answer: Json;
          let progress: Json[];
          if (transport === 'legacy') {
            assert.equal(res.status, 202, res.text);
            const mine = (m: Json) => m.result !== undefined && echoed(m).args?.tag === tag;
            answer = streamMessages(legacy.stream, legacyFrom).find(mine) ?? (await waitFor(() => streamMessages(legacy.stream, legacyFrom).find(mine), 5_000, `answer to ${tag}`));
            progress = streamMessages(legacy.stream, legacyFrom).filter((m) => m.method === 'notifications/progress' && m.params.message === tag);
          } else {
            assert.equal(res.status, 200, res.text);
            const all = messages(res);
            const answers = all.filter((m) => m.method === undefined);
            assert.equal(answers.length, 1, `one answer: ${res.text}`);
            answer = answers[0];
            progress = all.filter((m) => m.method === 'notifications/progress');
            if (transport === 'mcp-json' && wantToken !== undefined && steps > 0) {
              await waitFor(() => streamMessages(getStream, getFrom).filter((m) => m.params?.message === tag).length >= steps, 5_000, `progress of ${tag} on the GET stream`);
            }
            progress.push(...streamMessages(getStream, getFrom).filter((m) => m.method === 'notifications/progress' && m.params.message === tag));
          }
          assert.equal(answer.jsonrpc, '2.0');
          assert.ok(answer.id === wantId, `answer id ${JSON.stringify(answer.id)} (${typeof answer.id}) is the id sent, ${id.text}`);
          const seen = echoed(answer);
          assert.equal(seen.args.tag, tag);
          assert.equal(typeof seen.id, 'number', 'the child sees the proxy\'s own id');
          assert.equal(seen.token === null, wantToken === undefined, 'the child gets a progress token exactly when the client sent one');
          // Progress: exactly `steps` notifications, each with the client's own token (same type, same value).
          assert.equal(progress.length, wantToken === undefined ? 0 : steps, `progress notifications for ${tag}`);
          progress.forEach((p, i) => {
            assert.ok(p.params.progressToken === wantToken, `progress token ${JSON.stringify(p.params.progressToken)} is the one sent, ${tokenText}`);
            assert.equal(p.params.progress, i + 1, 'progress in order');
          });
        },
      ),
      params,
    ), 250);
    // Still serving afterwards.
    assert.equal((await request(`${h.url}/healthz`)).status, 200);
  });

  // ── Nesting depth ──

  // One level of a nested value: an array or an object around the inner value, maybe with a shallow sibling.
  const level = fc.record({ kind: fc.constantFrom('a' as const, 'o' as const), key: fc.string({ maxLength: 4 }), sibling: fc.option(fc.jsonValue({ maxDepth: 2 }), { freq: 3 }) });
  function nestText(leaf: unknown, levels: readonly { kind: 'a' | 'o'; key: string; sibling: unknown }[], extra: number): string {
    let text = JSON.stringify(leaf);
    for (const l of levels) {
      const sib = l.sibling === null ? '' : JSON.stringify(l.sibling);
      text = l.kind === 'a' ? `[${sib ? `${sib},` : ''}${text}]` : `{${sib ? `"s":${sib},` : ''}${JSON.stringify(`k${l.key}`)}:${text}}`;
    }
    // Far past any limit: built as text (a value this deep cannot be JSON.stringify'd).
    return extra > 0 ? '['.repeat(extra) + text + ']'.repeat(extra) : text;
  }
  const nested = fc.record({
    leaf: fc.jsonValue({ maxDepth: 2 }),
    levels: fc.array(level, { maxLength: 10 }),
    extra: fc.oneof({ weight: 12, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.constantFrom(120, 5_000, 100_000) }),
  }).map(({ leaf, levels, extra }) => nestText(leaf, levels, extra));

  it('client bodies nested up to maxJsonDepth (8) are answered; deeper → 400 -32600 "nested" (Streamable and legacy; requests, notifications, batches)', { timeout: 60_000 }, async (t) => {
    const MAX = 8;
    const h = await harness(t, { servers: [echoServer()] }, { limits: { ...FAST, maxJsonDepth: MAX } });
    await h.proxy.ready(10_000);
    const mcpUrl = `${h.url}/echo/mcp`;
    const sid = await rawSession(h.url, 'echo');
    const sidBatch = await rawSession(h.url, 'echo', '2025-03-26'); // batches exist only in 2025-03-26
    const legacy = await legacySession(h.url, 'echo');
    t.after(() => legacy.stream.close());
    let n = 0;
    await holds('nesting depth of client bodies', (params) => fc.assert(
      fc.asyncProperty(
        fc.constantFrom('mcp', 'legacy'),
        fc.constantFrom('request', 'notification', 'batch'),
        nested,
        async (transport, kind, v) => {
          const tag = `depth-${n++}`;
          const req = `{"jsonrpc":"2.0","id":${JSON.stringify(tag)},"method":"tools/call","params":{"name":"echo","arguments":{"tag":${JSON.stringify(tag)},"v":${v}}}}`;
          const body = kind === 'request' ? req : kind === 'batch' ? `[${req}]` : `{"jsonrpc":"2.0","method":"notifications/x-test","params":{"v":${v}}}`;
          const depth = jsonDepth(body);
          const url = transport === 'legacy' ? legacy.postUrl : mcpUrl;
          const headers = transport === 'legacy' ? {} : sessionHeaders(kind === 'batch' ? sidBatch : sid, kind === 'batch' ? { 'mcp-protocol-version': '2025-03-26' } : {});
          const from = legacy.stream.events.length;
          const res = await within(post(url, body, headers), 5_000, `POST depth ${depth}`);
          const what = `${transport} ${kind} of depth ${depth} (limit ${MAX})`;
          if (depth > MAX) {
            const err = assertRpcClientError(res, what);
            assert.equal(res.status, 400, `${what}: status`);
            assert.equal(err.error.code, -32600, `${what}: code`);
            assert.match(err.error.message, /nested/i, `${what}: message`);
            return;
          }
          if (kind === 'notification') return assert.equal(res.status, 202, `${what}: ${res.status} ${res.text}`);
          let answer: Json;
          if (transport === 'legacy') {
            assert.equal(res.status, 202, `${what}: ${res.status} ${res.text}`);
            answer = await waitFor(() => streamMessages(legacy.stream, from).find((m) => m.id === tag), 5_000, `answer to ${tag}`);
          } else {
            assert.equal(res.status, 200, `${what}: ${res.status} ${res.text}`);
            const all = messages(res);
            assert.equal(all.length, 1, res.text);
            if (kind === 'batch') assert.ok(Array.isArray(JSON.parse(res.text)), 'a batch is answered with a batch');
            answer = all[0];
          }
          assert.equal(answer.id, tag);
          assert.deepEqual(echoed(answer).args.v, JSON.parse(v), `${what}: the value reached the child and came back whole`);
        },
      ),
      params,
    ), 300);
    // Still serving afterwards.
    assert.equal((await request(`${h.url}/healthz`)).status, 200);
    const res = await post(mcpUrl, toolCall('"after"', { tag: 'after' }), sessionHeaders(sid));
    assert.equal(messages(res)[0].id, 'after', res.text);
  });

  it('child lines nested deeper than maxJsonDepth (8) are skipped and logged "nested"; such an answer fails its request with -32603 at once', { timeout: 60_000 }, async (t) => {
    const MAX = 8;
    const log: string[] = [];
    // requestTimeoutMs is long: an answer that is dropped silently shows as a hang (within() below), not as a timeout.
    const { h, mcpUrl, sid, legacy } = await echoProxy(t, { limits: { ...FAST, maxJsonDepth: MAX, requestTimeoutMs: 60_000 }, log: captureLog(log) });
    let n = 0;
    await holds('nesting depth of child lines', (params) => fc.assert(
      fc.asyncProperty(
        fc.constantFrom('mcp-sse', 'legacy'),
        nested,
        nested,
        async (transport, progressValue, answerValue) => {
          const tag = `cdepth-${n++}`;
          const progressLine = `{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":@TOKEN@,"progress":1,"message":${JSON.stringify(tag)},"v":${progressValue}}}`;
          const answerLine = `{"jsonrpc":"2.0","id":@ID@,"result":{"v":${answerValue}}}`;
          const progressDeep = jsonDepth(progressLine) > MAX;
          const answerDeep = jsonDepth(answerLine) > MAX;
          const nestedLogsBefore = log.filter((l) => /nested/i.test(l)).length;
          const body = toolCall(JSON.stringify(tag), { raw: [progressLine, answerLine] }, JSON.stringify(tag));
          const from = legacy.stream.events.length;
          let got: Json[];
          if (transport === 'legacy') {
            const res = await within(post(legacy.postUrl, body), 5_000, 'POST');
            assert.equal(res.status, 202, res.text);
            await within(waitFor(() => streamMessages(legacy.stream, from).some((m) => m.id === tag), 60_000, 'answer'), 5_000, `answer to ${tag} (progress depth ${jsonDepth(progressLine)}, answer depth ${jsonDepth(answerLine)})`);
            got = streamMessages(legacy.stream, from);
          } else {
            const res = await within(post(mcpUrl, body, sessionHeaders(sid, { accept: 'application/json, text/event-stream' })), 5_000,
              `answer to ${tag} (progress depth ${jsonDepth(progressLine)}, answer depth ${jsonDepth(answerLine)})`);
            assert.equal(res.status, 200, res.text);
            got = messages(res);
          }
          const progress = got.filter((m) => m.method === 'notifications/progress' && m.params.message === tag);
          const answers = got.filter((m) => m.id === tag);
          assert.equal(progress.length, progressDeep ? 0 : 1, `progress line of depth ${jsonDepth(progressLine)} (limit ${MAX})`);
          if (!progressDeep) assert.deepEqual(progress[0].params.v, JSON.parse(progressValue));
          assert.equal(answers.length, 1, 'one answer');
          if (answerDeep) {
            assert.equal(answers[0].error?.code, -32603, `answer line of depth ${jsonDepth(answerLine)}: ${JSON.stringify(answers[0]).slice(0, 200)}`);
          } else {
            assert.deepEqual(answers[0].result, { v: JSON.parse(answerValue) }, `answer line of depth ${jsonDepth(answerLine)}`);
          }
          const nestedLogs = log.filter((l) => /nested/i.test(l)).length - nestedLogsBefore;
          assert.ok(nestedLogs >= Number(progressDeep) + Number(answerDeep), `each skipped line is logged with "nested" (${nestedLogs} lines)`);
        },
      ),
      params,
    ), 150);
    assert.equal(h.proxy.status().echo!.restarts, 0, 'deep lines do not restart the child');
    assert.ok(log.every((l) => !l.startsWith('error')), `no error logged: ${log.filter((l) => l.startsWith('error')).join(' | ')}`);
  });

  // ── Interleavings of sessions on one shared child ──

  it('random interleavings of Streamable and legacy sessions with colliding ids and progress tokens: every answer and progress reaches exactly its own session, with its own id and token', { timeout: 60_000 }, async (t) => {
    const h = await harness(t, { servers: [echoServer()] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const mcpUrl = `${h.url}/echo/mcp`;
    const pid = h.proxy.status().echo!.pid;
    // Small pools, so ids and tokens collide across sessions (1 and "1", 0 and "" must stay apart too).
    const ID_POOL = [0, 1, 2, '0', '1', 'a', '', -1, 1.5];
    const TOKEN_POOL = [0, 1, '1', 't', '', 2.5];
    /** An id a loose comparison would confuse with `id`: the other JSON type of the same text, or 0 for a word. */
    const nearMiss = (id: string | number): string | number => (typeof id === 'number' ? String(id) : id === '' || Number.isNaN(Number(id)) ? 0 : Number(id));
    const requestArb = fc.record({
      id: fc.constantFrom(...ID_POOL),
      token: fc.option(fc.constantFrom(...TOKEN_POOL), { freq: 3 }),
      steps: fc.integer({ min: 0, max: 3 }),
      delayMs: fc.integer({ min: 0, max: 20 }),
      jsonOnly: fc.boolean(),
      sendAtMs: fc.integer({ min: 0, max: 15 }),
      // notifications/cancelled for this request's id, or for a near miss of it (which must cancel nothing else).
      cancel: fc.option(fc.record({ afterMs: fc.integer({ min: 0, max: 15 }), nearMiss: fc.boolean() }), { freq: 4 }),
      batchWithPrev: fc.boolean(),
    });
    const sessionArb = fc.record({
      transport: fc.constantFrom('mcp' as const, 'legacy' as const),
      version: fc.constantFrom('2025-06-18', '2025-03-26'), // 2025-03-26 Streamable sessions send batches too
      getStream: fc.boolean(),
      // Some sessions end (DELETE, or the legacy stream closes) while their requests are in flight.
      endAtMs: fc.option(fc.integer({ min: 0, max: 40 }), { freq: 6 }),
      requests: fc.uniqueArray(requestArb, { minLength: 1, maxLength: 6, selector: (r) => JSON.stringify(r.id) }),
    }).map((s) => {
      // A client keeps its in-flight progress tokens unique (spec); across sessions they collide freely.
      const used = new Set<string>();
      const unique = (token: string | number | null) => (token === null || used.has(JSON.stringify(token)) ? null : (used.add(JSON.stringify(token)), token));
      return { ...s, requests: s.requests.map((r) => ({ ...r, token: unique(r.token) })) };
    });
    type Spec = typeof sessionArb extends fc.Arbitrary<infer S> ? S : never;
    type Req = Spec['requests'][number] & { tag: string };
    type Unit = { reqs: Req[]; jsonOnly: boolean; sendAtMs: number; got: Json[] };
    type Live = { spec: Spec; reqs: Req[]; units: Unit[]; sid?: string; legacy?: Legacy; get?: SseStream; ended: boolean; seenByChild: Json[] };
    const later = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
    let run = 0;
    await holds('interleavings of sessions', (params) => fc.assert(
      fc.asyncProperty(fc.array(sessionArb, { minLength: 2, maxLength: 5 }), async (specs) => {
        run++;
        const sessions: Live[] = await Promise.all(specs.map(async (spec, s) => {
          const reqs = spec.requests.map((r, j) => ({ ...r, tag: `r${run}-s${s}-q${j}` }));
          // One POST per request, except that a 2025-03-26 Streamable session may put several in one batch.
          const units: Unit[] = [];
          for (const r of reqs) {
            const last = units[units.length - 1];
            if (last && r.batchWithPrev && spec.transport === 'mcp' && spec.version === '2025-03-26') last.reqs.push(r);
            else units.push({ reqs: [r], jsonOnly: r.jsonOnly, sendAtMs: r.sendAtMs, got: [] });
          }
          const live: Live = { spec, reqs, units, ended: false, seenByChild: [] };
          if (spec.transport === 'legacy') live.legacy = await legacySession(h.url, 'echo');
          else {
            live.sid = await rawSession(h.url, 'echo', spec.version);
            if (spec.getStream) live.get = await openSse(mcpUrl, { 'mcp-session-id': live.sid });
          }
          return live;
        }));
        const send = (live: Live, body: string, jsonOnly: boolean) => within(
          (live.legacy
            ? post(live.legacy.postUrl, body)
            : post(mcpUrl, body, sessionHeaders(live.sid!, { accept: jsonOnly ? 'application/json' : 'application/json, text/event-stream', 'mcp-protocol-version': live.spec.version }))
          ).catch((err: Error) => {
            throw new Error(`POST ${body.slice(0, 160)} to a ${live.spec.transport} session${live.ended ? ' (ended)' : ''}: ${err.message}`);
          }),
          10_000, 'POST');
        /** Requests of `live` that some cancel of its own may name. */
        const cancellable = (live: Live, q: Req) => live.reqs.some((r) => r.cancel !== null && (r.cancel.nearMiss ? nearMiss(r.id) : r.id) === q.id);
        try {
          // Every POST of every session at once, each at its own offset; some cancels; some sessions end.
          await Promise.all(sessions.flatMap((live) => [
            ...live.units.map(async (unit) => {
              await later(unit.sendAtMs);
              const bodies = unit.reqs.map((r) => toolCall(JSON.stringify(r.id), { tag: r.tag, progress: r.steps, delayMs: cancellable(live, r) ? 30 : r.delayMs },
                r.token === null ? undefined : JSON.stringify(r.token)));
              const sent = send(live, unit.reqs.length > 1 ? `[${bodies.join(',')}]` : bodies[0]!, unit.jsonOnly);
              const cancels = unit.reqs.filter((r) => r.cancel !== null).map((r) => later(r.cancel!.afterMs).then(() => send(live, JSON.stringify({
                jsonrpc: '2.0', method: 'notifications/cancelled', params: { requestId: r.cancel!.nearMiss ? nearMiss(r.id) : r.id, reason: 'property test' } }), false)));
              const [res, ...cancelled] = await Promise.all([sent, ...cancels]); // (all awaited: no rejection goes unhandled)
              for (const c of cancelled) if (!(live.ended && c.status === 404)) assert.equal(c.status, 202, c.text);
              if (live.ended && res!.status === 404) return; // sent after its session ended
              if (live.legacy) assert.equal(res!.status, 202, res!.text);
              else {
                assert.equal(res!.status, 200, res!.text);
                unit.got.push(...messages(res!));
              }
            }),
            (async () => {
              if (live.spec.endAtMs === null) return;
              await later(live.spec.endAtMs);
              live.ended = true;
              if (live.legacy) live.legacy.stream.close();
              else assert.equal((await request(mcpUrl, { method: 'DELETE', headers: { 'mcp-session-id': live.sid! } })).status, 200);
            })(),
          ]));
          // A last request per live session, whose progress (at 40 ms) and answer (at 80 ms) the child sends after all
          // it was asked above (at most 30 ms): once they are in (its progress on the GET stream, its answer on the
          // legacy stream), any stray message would be in too.
          await Promise.all(sessions.filter((live) => !live.ended).map(async (live) => {
            const token = 'sentinel';
            const body = toolCall('"sentinel"', { tag: 'sentinel', progress: 1, delayMs: 80 }, JSON.stringify(token));
            const res = await send(live, body, live.get !== undefined);
            if (live.legacy) await waitFor(() => streamMessages(live.legacy!.stream).some((m) => m.id === 'sentinel'), 5_000, 'legacy sentinel');
            else assert.equal(res.status, 200, res.text);
            if (live.get) await waitFor(() => streamMessages(live.get!).some((m) => m.params?.progressToken === token), 5_000, 'GET stream sentinel');
          }));
          const notSentinel = (m: Json) => m.id !== 'sentinel' && m.params?.progressToken !== 'sentinel';
          for (const live of sessions) {
            const who = `session ${live.reqs[0]!.tag.replace(/-q\d+$/, '')} (${live.spec.transport}${live.ended ? ', ended' : ''})`;
            // A POST's own stream or body carries only that POST's answers and progress.
            for (const unit of live.units) {
              for (const m of unit.got.filter(notSentinel)) {
                const mine = m.method === 'notifications/progress'
                  ? unit.reqs.some((r) => r.token !== null && r.token === m.params.progressToken)
                  : unit.reqs.some((r) => r.id === m.id);
                assert.ok(mine, `${who}: a POST of ids ${JSON.stringify(unit.reqs.map((r) => r.id))} got ${JSON.stringify(m)}`);
              }
            }
            // Every message the session received, on every channel it has.
            const got = [...live.units.flatMap((u) => u.got), ...(live.legacy ? streamMessages(live.legacy.stream).filter((m) => m.id !== 'init') : []), ...(live.get ? streamMessages(live.get) : [])]
              .filter(notSentinel);
            const answers = new Map<Req, Json[]>();
            const progress = new Map<Req, Json[]>();
            for (const m of got) {
              if (m.method === 'notifications/progress') {
                const r = live.reqs.find((q) => q.token !== null && q.token === m.params.progressToken);
                assert.ok(r, `${who}: progress with a token it never sent: ${JSON.stringify(m)}`);
                assert.equal(m.params.message, r.tag, `${who}: progress for token ${JSON.stringify(r.token)} is its own request's, not another session's`);
                progress.set(r, [...(progress.get(r) ?? []), m]);
              } else {
                assert.equal(m.method, undefined, `${who}: only answers and progress: ${JSON.stringify(m)}`);
                const r = live.reqs.find((q) => q.id === m.id);
                assert.ok(r, `${who}: an answer with an id it never sent: ${JSON.stringify(m)}`);
                answers.set(r, [...(answers.get(r) ?? []), m]);
                if (m.result !== undefined) {
                  const seen = echoed(m);
                  assert.equal(seen.args.tag, r.tag, `${who}: the answer with id ${JSON.stringify(r.id)} is its own request's, not another session's`);
                  live.seenByChild.push(seen);
                }
              }
            }
            for (const r of live.reqs) {
              const a = answers.get(r) ?? [];
              const p = progress.get(r) ?? [];
              const what = `${who}: ${r.tag} (id ${JSON.stringify(r.id)}, token ${JSON.stringify(r.token)})`;
              assert.ok(a.length <= 1, `${what} is answered at most once: ${JSON.stringify(a)}`);
              assert.ok(p.length <= r.steps, `${what}: at most its own ${r.steps} progress notifications, got ${p.length}`);
              assert.deepEqual(p.map((x) => x.params.progress), p.map((_, i) => i + 1), `${what}: progress in order`);
              if (a[0]?.error) {
                // -32800: cancelled by its session; -32004: its session ended while it was in flight.
                const allowed = [...(cancellable(live, r) ? [-32800] : []), ...(live.ended ? [-32004] : [])];
                assert.ok(allowed.includes(a[0].error.code), `${what}: error ${JSON.stringify(a[0])}, expected one of ${JSON.stringify(allowed)}`);
              }
              if (live.ended) continue; // what it got before it ended was its own; how much it got is timing
              assert.equal(a.length, 1, `${what} is answered exactly once`);
              if (cancellable(live, r)) continue; // its answer, or the cancellation error if the cancel came first
              assert.ok(a[0].result, `${what}: answered with a result: ${JSON.stringify(a[0])}`);
              // JSON-only POSTs have no stream of their own: their progress goes to the GET stream if one is open.
              const unit = live.units.find((u) => u.reqs.includes(r))!;
              const reachable = r.token !== null && (live.legacy !== undefined || !unit.jsonOnly || live.get !== undefined);
              assert.equal(p.length, reachable ? r.steps : 0, `${what}: progress notifications`);
            }
          }
          // What the child saw: every request under an id and a token of its own, never a client's.
          const seen = sessions.flatMap((live) => live.seenByChild);
          const childIds = seen.map((x) => JSON.stringify(x.id));
          assert.equal(new Set(childIds).size, childIds.length, `child ids are unique across sessions: ${childIds.join(' ')}`);
          const childTokens = seen.filter((x) => x.token !== null).map((x) => JSON.stringify(x.token));
          assert.equal(new Set(childTokens).size, childTokens.length, `child progress tokens are unique across sessions: ${childTokens.join(' ')}`);
        } finally {
          await Promise.all(sessions.map(async (live) => {
            live.get?.close();
            live.legacy?.stream.close();
            if (live.sid && !live.ended) await request(mcpUrl, { method: 'DELETE', headers: { 'mcp-session-id': live.sid } });
          }));
        }
      }),
      params,
    ), 80, 25_000);
    const s = h.proxy.status().echo!;
    assert.equal(s.pid, pid, 'all sessions shared one child');
    assert.equal(s.restarts, 0);
  });

  // ── Random bodies ──

  it('random bodies (fc.json, fc.anything, bytes, JSON-RPC-shaped, deep) to both POST endpoints: never 5xx, 4xx bodies are JSON-RPC errors, and the proxy keeps answering', { timeout: 60_000 }, async (t) => {
    // Default limits: maxJsonDepth 128, so depths 5,000 and 100,000 (which once crashed the proxy) are "past limits".
    const h = await harness(t, { servers: [echoServer()] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const mcpUrl = `${h.url}/echo/mcp`;
    const sid = await rawSession(h.url, 'echo');
    const sid0326 = await rawSession(h.url, 'echo', '2025-03-26');
    const legacy = await legacySession(h.url, 'echo');
    t.after(() => legacy.stream.close());
    const pid = h.proxy.status().echo!.pid;

    const METHODS = ['initialize', 'ping', 'tools/call', 'tools/list', 'resources/subscribe', 'resources/unsubscribe', 'notifications/initialized',
      'notifications/cancelled', 'notifications/progress', 'notifications/roots/list_changed', 'roots/list', 'sampling/createMessage',
      'server/discover', 'logging/setLevel'];
    const anyId = fc.oneof(fc.integer(), fc.string({ maxLength: 4 }), fc.constant(null), fc.boolean(), fc.double(), fc.object({ maxDepth: 1 }), fc.array(fc.anything({ maxDepth: 1 }), { maxLength: 2 }));
    const rpcLike = fc.record({
      jsonrpc: fc.oneof({ weight: 5, arbitrary: fc.constant('2.0') }, { weight: 1, arbitrary: fc.anything({ maxDepth: 1 }) }),
      id: anyId,
      method: fc.oneof({ weight: 4, arbitrary: fc.constantFrom(...METHODS) }, { weight: 1, arbitrary: fc.string() }, { weight: 1, arbitrary: fc.anything({ maxDepth: 1 }) }),
      params: fc.oneof(
        fc.record({
          name: fc.constant('echo'),
          arguments: fc.oneof(fc.dictionary(fc.constantFrom('tag', 'x', 'progress'), fc.jsonValue({ maxDepth: 2 })), fc.anything({ maxDepth: 2 })),
          _meta: fc.record({ progressToken: fc.oneof(anyId, fc.anything({ maxDepth: 1 })) }, { requiredKeys: [] }),
          requestId: anyId,
          uri: fc.string({ maxLength: 8 }),
          protocolVersion: fc.constantFrom('2025-06-18', '2025-03-26', 'x'),
          capabilities: fc.anything({ maxDepth: 2 }),
        }, { requiredKeys: [] }),
        fc.anything({ maxDepth: 2 }),
      ),
      result: fc.anything({ maxDepth: 2 }),
      error: fc.anything({ maxDepth: 2 }),
    }, { requiredKeys: [] });
    const text = (v: unknown) => JSON.stringify(v) ?? 'undefined';
    const deepBody = fc.record({ depth: fc.constantFrom(120, 125, 126, 127, 128, 129, 5_000, 100_000), kind: fc.constantFrom('a', 'o'), request: fc.boolean() }).map(({ depth, kind, request: asRequest }) => {
      // `depth` containers around a 1 inside the message's params (the message itself adds 2).
      const open = kind === 'a' ? '[' : '{"k":';
      const close = kind === 'a' ? ']' : '}';
      const v = open.repeat(depth) + '1' + close.repeat(depth);
      return asRequest ? `{"jsonrpc":"2.0","id":"deep","method":"tools/call","params":{"name":"echo","arguments":{"tag":"deep"},"v":${v}}}` : `{"jsonrpc":"2.0","method":"notifications/x","params":{"v":${v}}}`;
    });
    const bodyArb: fc.Arbitrary<string | Buffer> = fc.oneof(
      fc.json(),
      fc.anything().map(text),
      fc.uint8Array({ maxLength: 64 }).map((b) => Buffer.from(b)),
      rpcLike.map(text),
      fc.array(rpcLike, { maxLength: 3 }).map(text),
      deepBody,
      // Truncated or doubled valid messages.
      fc.tuple(rpcLike.map(text), fc.nat()).map(([s, k]) => s.slice(0, k % (s.length + 1))),
      rpcLike.map((m) => text(m) + text(m)),
    );
    const targets = ['mcp-session', 'mcp-session-2025-03-26', 'mcp-no-session', 'mcp-unknown-session', 'messages'] as const;
    let n = 0;
    await holds('random bodies', (params) => fc.assert(
      fc.asyncProperty(fc.constantFrom(...targets), bodyArb, async (target, body) => {
        n++;
        const headers: Record<string, string> =
          target === 'mcp-session' ? sessionHeaders(sid, { accept: 'application/json, text/event-stream' })
          : target === 'mcp-session-2025-03-26' ? sessionHeaders(sid0326, { 'mcp-protocol-version': '2025-03-26' })
          : target === 'mcp-unknown-session' ? sessionHeaders('no-such-session')
          : {};
        const url = target === 'messages' ? legacy.postUrl : mcpUrl;
        const res = await within(request(url, { method: 'POST', headers: { ...JSON_HEADERS, ...headers }, body }), 10_000, `POST to ${target}`);
        const what = `${target} ${String(body).slice(0, 200)} → ${res.status} ${res.text.slice(0, 200)}`;
        assert.ok(res.status < 500, `never 5xx for client input: ${what}`);
        let parsed: unknown;
        let isJson = true;
        try {
          parsed = JSON.parse(Buffer.isBuffer(body) ? body.toString('utf8') : body);
        } catch {
          isJson = false;
        }
        if (res.status >= 400) {
          const err = assertRpcClientError(res, what);
          if (!isJson) {
            assert.equal(res.status, 400, `not JSON: ${what}`);
            assert.equal(err.error.code, -32700, `not JSON → parse error: ${what}`);
          } else if (parsed === null || typeof parsed !== 'object') {
            assert.equal(res.status, 400, `not a JSON-RPC message: ${what}`);
            assert.equal(err.error.code, -32600, `JSON but not JSON-RPC → invalid request: ${what}`);
          }
        } else {
          assert.ok(isJson, `accepted only JSON: ${what}`);
          assert.ok([200, 202].includes(res.status), what);
          if (res.status === 200) for (const m of messages(res)) assert.equal(m.jsonrpc, '2.0', what);
        }
        // Still serving: health, and a fresh request on the same child.
        assert.equal((await within(request(`${h.url}/healthz`), 5_000, 'healthz')).status, 200, `healthz after ${what}`);
        const check = await within(post(mcpUrl, toolCall(`"check-${n}"`, { tag: `check-${n}` }), sessionHeaders(sid)), 5_000, 'check request');
        assert.equal(check.status, 200, `a fresh request after ${what}: ${check.text}`);
        assert.equal(messages(check)[0].id, `check-${n}`);
      }),
      params,
    ), 600, 20_000);
    // A new session still opens and works, and it is still the same child.
    const fresh = await rawSession(h.url, 'echo');
    const res = await post(mcpUrl, toolCall('"fresh"', { tag: 'fresh' }), sessionHeaders(fresh));
    assert.equal(echoed(messages(res)[0]).args.tag, 'fresh');
    assert.equal(h.proxy.status().echo!.pid, pid, 'no input restarted the child');
  });

  // ── Child lines: raw CR whitespace and where the id stands ──

  /** A JSON text of `v` with whitespace (space, tab and raw CR, never LF) drawn from `ws` between every token. */
  function spaced(v: unknown, ws: () => string): string {
    if (v === null || typeof v !== 'object') return JSON.stringify(v);
    if (Array.isArray(v)) return `[${ws()}${v.map((x) => spaced(x, ws)).join(`${ws()},${ws()}`)}${ws()}]`;
    return `{${ws()}${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}${ws()}:${ws()}${spaced(x, ws)}`).join(`${ws()},${ws()}`)}${ws()}}`;
  }
  /** A deterministic whitespace source from a seed (mulberry32), so fast-check replays it. */
  function whitespace(seed: number, crHeavy: boolean): () => string {
    let a = seed >>> 0;
    const next = () => {
      a = (a + 0x6d2b79f5) >>> 0;
      let x = Math.imul(a ^ (a >>> 15), 1 | a);
      x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
      return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
    };
    const chars = crHeavy ? ['\r', '\r', '\r', ' ', '\t'] : ['\r', ' ', '\t'];
    return () => {
      let s = '';
      for (let k = Math.floor(next() * 4) - 1; k > 0; k--) s += chars[Math.floor(next() * chars.length)];
      return s;
    };
  }

  it('a child answer with raw CR whitespace between tokens, its id first, last, elsewhere or spelled 5.0, reaches the client as the same value under its own id (JSON, POST stream, legacy stream)', { timeout: 60_000 }, async (t) => {
    const { h, mcpUrl, sid, legacy } = await echoProxy(t, { limits: FAST });
    let n = 0;
    await holds('CR whitespace in child lines', (params) => fc.assert(
      fc.asyncProperty(
        fc.constantFrom('mcp-json', 'mcp-sse', 'legacy'),
        validIdText,
        fc.jsonValue({ maxDepth: 4 }),
        fc.constantFrom('first', 'last', 'spaced', 'middle'),
        fc.constantFrom('', '.0', 'e0', 'E+00', '.000e0'),
        fc.constantFrom(0, 0, 20_000), // 20,000: over 16 KiB, where the child's own bytes are spliced
        fc.integer(),
        fc.boolean(),
        async (transport, idText, value, layout, idSpelling, pad, seed, crHeavy) => {
          const tag = `cr-${n++}`;
          const ws = whitespace(seed, crHeavy);
          const id = `@ID@${idSpelling}`;
          const result = spaced(value, ws);
          const padMember = pad > 0 ? `,${ws()}"pad"${ws()}:${ws()}"${'z'.repeat(pad)}"` : '';
          const line =
            layout === 'first' ? `{"jsonrpc":"2.0","id":${id},${ws()}"result"${ws()}:${ws()}${result}${padMember}${ws()}}${ws()}`
            : layout === 'last' ? `{${ws()}"jsonrpc"${ws()}:${ws()}"2.0"${ws()},${ws()}"result"${ws()}:${ws()}${result}${padMember}${ws()},"id":${id}}`
            : layout === 'middle' ? `{"jsonrpc":"2.0",${ws()}"result":${result},${ws()}"id":${id},${ws()}"x":1${padMember}}`
            : `${ws()}{${ws()}"id"${ws()}:${ws()}${id}${ws()},${ws()}"jsonrpc"${ws()}:${ws()}"2.0"${ws()},${ws()}"result"${ws()}:${ws()}${result}${padMember}${ws()}}${ws()}`;
          const progressLine = `{${ws()}"jsonrpc":"2.0",${ws()}"method":"notifications/progress",${ws()}"params":${ws()}{"progressToken":${ws()}@TOKEN@,"progress":1,"message":${JSON.stringify(tag)}${ws()}}${ws()}}`;
          const withProgress = transport !== 'mcp-json';
          const body = toolCall(idText, { raw: withProgress ? [progressLine, line] : [line] }, withProgress ? JSON.stringify(tag) : undefined);
          const from = legacy.stream.events.length;
          const wantId = JSON.parse(idText);
          let got: Json[];
          if (transport === 'legacy') {
            const res = await within(post(legacy.postUrl, body), 5_000, 'POST');
            assert.equal(res.status, 202, res.text);
            await waitFor(() => streamMessages(legacy.stream, from).some((m) => m.result !== undefined || m.error !== undefined), 5_000, `answer to ${tag}`);
            got = streamMessages(legacy.stream, from);
          } else {
            const res = await within(post(mcpUrl, body, sessionHeaders(sid, { accept: transport === 'mcp-json' ? 'application/json' : 'application/json, text/event-stream' })), 5_000, `answer to ${tag}`);
            assert.equal(res.status, 200, res.text.slice(0, 300));
            got = messages(res);
          }
          const answers = got.filter((m) => m.method === undefined);
          assert.equal(answers.length, 1, `one answer (${layout}, id spelled @ID@${idSpelling}): ${JSON.stringify(got).slice(0, 300)}`);
          assert.ok(answers[0].id === wantId, `answer id ${JSON.stringify(answers[0].id)} is the client's ${idText} (${layout}, id spelled @ID@${idSpelling})`);
          assert.deepEqual(answers[0].result, JSON.parse(JSON.stringify(value)), `result value (${layout})`);
          if (pad > 0) assert.equal(answers[0].pad.length, pad);
          if (withProgress) {
            const p = got.filter((m) => m.method === 'notifications/progress');
            assert.equal(p.length, 1, 'its progress notification');
            assert.equal(p[0].params.progressToken, tag);
            assert.equal(p[0].params.message, tag);
          }
        },
      ),
      params,
    ), 200);
  });

  it('a child answer over maxLineBytes, its id first, last or amid decoy "id"s, fails exactly its own request with -32006 at once; a same-id request of another session is untouched', { timeout: 60_000 }, async (t) => {
    const MAX_LINE = 4096;
    const { h, mcpUrl, sid, legacy } = await echoProxy(t, { limits: { ...FAST, maxLineBytes: MAX_LINE, requestTimeoutMs: 60_000 } });
    const other = await rawSession(h.url, 'echo');
    let n = 0;
    await holds('oversized child answers', (params) => fc.assert(
      fc.asyncProperty(
        fc.constantFrom('mcp-json', 'mcp-sse', 'legacy'),
        validIdText,
        fc.constantFrom('first', 'last', 'middle'),
        fc.array(fc.oneof(fc.integer().map((k) => `"x":{"id":${k}}`), fc.integer().map((k) => `"s":"\\"id\\":${k}"`), fc.integer().map((k) => `"idx":${k}`),
          fc.integer().map((k) => `"a":[{"id":${k}},${k}]`),
          // Keys that are not "id" but whose escapes hide an i and a d, valued with the id of the request sent just
          // before (the other session's, below): the proxy must not take it for this line's id.
          fc.constantFrom('"i\\nd":@IDM1@', '"\\"id":@IDM1@', '"i\\\\d":@IDM1@')), { maxLength: 3 }),
        fc.integer({ min: MAX_LINE - 200, max: 3 * MAX_LINE }),
        fc.integer(),
        async (transport, idText, layout, decoys, pad, seed) => {
          const tag = `big-${n++}`;
          const ws = whitespace(seed, true);
          const members = [...decoys, `"result":{"content":[{"type":"text","text":"${'z'.repeat(pad)}"}]}`];
          const line =
            layout === 'first' ? `{"jsonrpc":"2.0",${ws()}"id"${ws()}:${ws()}@ID@${ws()},${members.join(`${ws()},`)}}`
            : layout === 'last' ? `{"jsonrpc":"2.0",${members.join(`,${ws()}`)},${ws()}"id":@ID@${ws()}}`
            : `{"jsonrpc":"2.0",${[...members.slice(0, 1), '"id":@ID@', ...members.slice(1)].join(',')}}`;
          // @ID@ and @IDM1@ become child ids (1 to 6 digits here, unknown yet): lines that close to the limit are left out.
          const placeholders = line.split(/@ID@|@IDM1@/).length - 1;
          const bytes = Buffer.byteLength(line.replace(/@ID@|@IDM1@/g, ''));
          fc.pre(bytes + 6 * placeholders <= MAX_LINE || bytes + placeholders > MAX_LINE);
          const big = bytes + placeholders > MAX_LINE;
          // Meanwhile another session asks with the same client id; its answer comes after the big line.
          const theirs = within(post(mcpUrl, toolCall(idText, { tag: `${tag}-other`, delayMs: 30 }), sessionHeaders(other)), 5_000, 'other session');
          const body = toolCall(idText, { raw: [line] });
          const from = legacy.stream.events.length;
          const mine = transport === 'legacy'
            ? within(post(legacy.postUrl, body), 5_000, 'POST')
            : within(post(mcpUrl, body, sessionHeaders(sid, { accept: transport === 'mcp-json' ? 'application/json' : 'application/json, text/event-stream' })), 5_000,
              `answer to ${tag} (${Buffer.byteLength(line)} bytes): ${line.slice(0, 120)}`);
          mine.catch(() => {}); // awaited below, after the other session's answer is checked
          const res = await theirs;
          assert.equal(res.status, 200, res.text);
          const their = messages(res)[0];
          assert.ok(their.id === JSON.parse(idText), 'the other session gets its own id');
          assert.ok(their.result, `the other session's request is answered by its own answer, not failed by this session's line: it got ${JSON.stringify(their)} when this session's child answer was ${line.slice(0, 120)}`);
          assert.equal(echoed(their).args.tag, `${tag}-other`);
          const ownRes = await mine;
          let answer: Json;
          if (transport === 'legacy') {
            assert.equal(ownRes.status, 202, ownRes.text);
            answer = await within(waitFor(() => streamMessages(legacy.stream, from).find((m) => m.method === undefined), 60_000, 'answer'), 5_000, `answer to ${tag} (${Buffer.byteLength(line)} bytes)`);
          } else {
            assert.equal(ownRes.status, 200, ownRes.text.slice(0, 300));
            answer = messages(ownRes)[0];
          }
          assert.ok(answer.id === JSON.parse(idText), `the answer carries the client's id ${idText}: ${JSON.stringify(answer).slice(0, 300)}`);
          if (big) {
            assert.equal(answer.error?.code, -32006, `a ${bytes}-byte answer plus ids (limit ${MAX_LINE}): ${JSON.stringify(answer).slice(0, 300)}`);
            assert.match(answer.error.message, /maxLineBytes/);
            assert.match(answer.error.message, new RegExp(String(MAX_LINE)));
          } else assert.equal(answer.result?.content?.[0]?.text, 'z'.repeat(pad));
        },
      ),
      params,
    ), 80);
  });

  it('a child answer that repeats its "id" member (JSON.parse keeps the last) still reaches the client under the client\'s own id', { timeout: 30_000 }, async (t) => {
    const h = await harness(t, { servers: [echoServer()] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const mcpUrl = `${h.url}/echo/mcp`;
    const sid = await rawSession(h.url, 'echo');
    await holds('repeated id member', (params) => fc.assert(
      fc.asyncProperty(
        validIdText,
        fc.constantFrom(
          '{"jsonrpc":"2.0","id":@ID@,"result":{},"id":@ID@}', // id first (the spliced prefix) and again last
          '{"jsonrpc":"2.0","id":@ID@,"result":{"a":1},"id":@ID@.0}',
          '{"jsonrpc":"2.0","id":999999,"result":{},"id":@ID@}',
          '{"jsonrpc":"2.0","result":{},"id":@ID@,"id":@ID@}',
        ),
        async (idText, line) => {
          const res = await within(post(mcpUrl, toolCall(idText, { raw: [line] }), sessionHeaders(sid)), 5_000, 'answer');
          assert.equal(res.status, 200, res.text);
          const answer = JSON.parse(res.text);
          assert.ok(answer.id === JSON.parse(idText), `client sent id ${idText}; the child wrote ${line}; the client got ${res.text}`);
        },
      ),
      params,
    ), 40);
  });
});

// ── Fuzz: a running proxy under mutated HTTP, JSON-RPC and child output (bounded) ──────────────────────────
//
// fast-check drives a proxy started in-process (the harness, real children, real sockets) with mutated input
// and checks what must hold whatever the input:
//   - never a crash: /healthz answers after every input, and real calls are answered after the run;
//   - never a 5xx for client input (the allowed statuses are listed at ALLOWED_STATUSES), never a 500, and
//     never an "internal error" in the log (the error boundary caught a throw no status showed);
//   - never a hang: every exchange is bounded (requestTimeoutMs is small, so a child that never answers
//     costs the client an error, not a wait);
//   - never a leaked session or child: once the run's sessions are DELETEd, closed or idle-expired
//     (sessionIdleMs 1.5 s, sweep 100 ms), status().X.sessions and the per-session children are back to 0,
//     every per-session child in the pid file is dead, and the harness finds no process left at stop;
//   - memory back to its baseline: heapUsed of this process (proxy included) after forced GCs, measured after
//     a warm-up round and again after a main round several times longer (tolerance at FUZZ_HEAP_SLACK).
// Bounded in time: each round stops at its numRuns or its time budget, whichever comes first (together about
// 60 s on 2 cores). Reproducible: the inputs follow FUZZ_SEED (fixed unless set), printed on failure.

describe('Fuzz: a running proxy under mutated HTTP, JSON-RPC and child output (bounded)', () => {
  const FUZZ_SEED = process.env.FUZZ_SEED === undefined ? 0xf022_0001 : Number(process.env.FUZZ_SEED);

  /** Small limits: sessions idle out, requests time out and bodies and lines are capped within the run. */
  const FUZZ_LIMITS: Partial<Limits> = {
    ...FAST, sessionIdleMs: 1_500, sweepIntervalMs: 100, requestTimeoutMs: 1_500, sseKeepaliveMs: 500,
    maxBodyBytes: 64 * KIB, maxLineBytes: 32 * KIB, maxJsonDepth: 32,
    headersTimeoutMs: 1_000, httpRequestTimeoutMs: 2_000, keepAliveTimeoutMs: 1_000, connectionsCheckIntervalMs: 200,
  };
  /** Upper bound for one exchange: requestTimeoutMs + a sweep + scheduling slack on a shared 2-core machine. */
  const EXCHANGE_MS = 8_000;

  /**
   * Statuses the proxy may answer client input with; anything else fails the run.
   *   200 202 204  served (204: a CORS preflight).
   *   400 malformed HTTP (Node's parser) or JSON-RPC; 401 403 auth and the Host/Origin guards (a foreign Origin
   *   is 403 by design); 404 unknown route or session; 405 method; 406 Accept; 408 Node's request timeout;
   *   409 a second GET stream; 413 body over maxBodyBytes; 415 Content-Type; 417 Node's answer to an unknown
   *   Expect; 429 a queue or rate limit; 431 too many or too large header fields (maxHeadersCount, Node's 16 KiB).
   *   503 only with Retry-After: a server starting or restarting, or busy (too many sessions, per-session
   *   children or body bytes in flight) — the state of the server, not a verdict on the input; and /readyz's
   *   "not ready", which is what a readiness probe is for.
   * 500 (the error boundary caught a throw) and every other 5xx are failures.
   */
  const ALLOWED_STATUSES = new Set([200, 202, 204, 400, 401, 403, 404, 405, 406, 408, 409, 413, 415, 417, 429, 431]);
  function assertAllowed(status: number, headers: Record<string, unknown>, what: string, path = ''): void {
    if (ALLOWED_STATUSES.has(status)) return;
    if (status === 503 && headers['retry-after'] !== undefined) return;
    if (status === 503 && /^\/readyz(\?|$)/.test(path)) return; // the readiness probe's "not ready" (an unknown ?server= is not ready)
    assert.fail(`status ${status} is not one the proxy may answer client input with: ${what}`);
  }

  /**
   * The heap may end at most this much above its baseline. The baseline is taken after a warm-up round of the
   * same fuzz, so code compiled for the paths it hits, inline caches, Node's socket and parser pools and the
   * fast-check state already exist; what is left is allocator noise (a few hundred KiB to a couple of MiB here,
   * with 4 forced GCs). The main round sends several times the warm-up's inputs: a per-request or per-session
   * leak of even 5 KiB over its ~1,000 exchanges (with their 64 KiB bodies and 32 KiB child lines) passes it.
   */
  const FUZZ_HEAP_SLACK = 4 * MIB;
  function heapAfterGc(): number {
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc') as () => void;
    for (let i = 0; i < 4; i++) gc();
    return process.memoryUsage().heapUsed;
  }

  /**
   * The input being tried. At its time limit fast-check returns without waiting for the input in flight: fuzz()
   * waits for it (and reports its failure), so no exchange is left running into the settle and heap measures.
   */
  let lastInput: Promise<void> = Promise.resolve();
  function tracked<A extends unknown[]>(predicate: (...args: A) => Promise<void>): (...args: A) => Promise<void> {
    return (...args: A) => (lastInput = predicate(...args));
  }

  type RunParams = { seed: number; numRuns: number; interruptAfterTimeLimit: number; includeErrorInReport: boolean; endOnFailure: boolean };
  /** fc.assert with FUZZ_SEED (+ `offset`, so the warm-up and main rounds differ), stopped at numRuns or budgetMs. */
  async function fuzz(what: string, offset: number, numRuns: number, budgetMs: number, run: (params: RunParams) => Promise<void>): Promise<void> {
    const seed = (FUZZ_SEED + offset) | 0;
    try {
      // endOnFailure: a shrink would replay dozens of exchanges against a proxy the failing one changed; the
      // first counterexample, with its seed, is the reproduction.
      await run({ seed, numRuns, interruptAfterTimeLimit: budgetMs, includeErrorInReport: true, endOnFailure: true });
      await within(lastInput, 2 * EXCHANGE_MS, 'the input in flight at the time limit');
    } catch (err) {
      const e = err as Error;
      e.message = `fuzz "${what}" failed with fast-check seed ${seed} (replay: FUZZ_SEED=${FUZZ_SEED})\n${e.message}`;
      throw e;
    }
  }

  /** A bounded log: counts lines, keeps error lines (at most 200) for the "internal error" check. */
  function fuzzLog(t: TestContext): { log: NonNullable<NonNullable<StartOptions>['log']>; errors: string[]; assertNoInternalError(): void } {
    const errors: string[] = [];
    let checked = false;
    // On a failure, the proxy's error and warning lines (the first 50) go to the report.
    t.after(() => {
      if (!checked) for (const line of errors.slice(0, 50)) t.diagnostic(`log: ${line.slice(0, 500)}`);
    });
    const keep = (level: string) => (scope: string, text: string) => {
      if (errors.length < 200 && (level === 'error' || /internal error/.test(text))) errors.push(`${level} [${scope}] ${text}`);
    };
    return {
      log: { error: keep('error'), warn: keep('warn'), info: () => {}, debug: () => {}, enabled: (level) => level === 'error' || level === 'warn' },
      errors,
      assertNoInternalError: () => {
        assert.deepEqual(errors.filter((l) => /internal error/.test(l)), [], 'the error boundary caught a throw');
        checked = true;
      },
    };
  }

  /**
   * Warm-up round, settle, heap baseline, main round, settle, heap again: the shape of every fuzz below.
   * `settle` must bring sessions and per-session children back to 0 (it asserts that) before each measure.
   */
  async function warmThenMain(
    t: TestContext,
    round: (offset: number, numRuns: number, budgetMs: number) => Promise<number>,
    settle: () => Promise<void>,
    sizes: { warm: number; main: number; warmMs: number; mainMs: number },
  ): Promise<void> {
    const warmRuns = await round(1, sizes.warm, sizes.warmMs);
    await settle();
    const before = heapAfterGc();
    const started = Date.now();
    const mainRuns = await round(2, sizes.main, sizes.mainMs);
    const mainMs = Date.now() - started;
    await settle();
    // Closed sockets and finished exchanges may still be referenced by a timer for a moment: poll (bounded).
    let afterHeap = heapAfterGc();
    await waitFor(() => (afterHeap = heapAfterGc()) - before < FUZZ_HEAP_SLACK, 5_000, 'the heap to come back to its baseline').catch(() => {});
    const grew = afterHeap - before;
    t.diagnostic(`seed ${FUZZ_SEED}: warm-up ${warmRuns} inputs, main ${mainRuns} inputs in ${mainMs} ms; heap ${(before / MIB).toFixed(1)} → ${(afterHeap / MIB).toFixed(1)} MiB (${grew >= 0 ? '+' : ''}${(grew / KIB).toFixed(0)} KiB)`);
    assert.ok(mainRuns >= sizes.warm, `the main round ran ${mainRuns} inputs, fewer than the warm-up's ${sizes.warm}: the heap comparison would say little`);
    assert.ok(grew < FUZZ_HEAP_SLACK, `heapUsed grew ${(grew / KIB).toFixed(0)} KiB over ${mainRuns} inputs (slack ${FUZZ_HEAP_SLACK / KIB} KiB): ${before} → ${afterHeap}`);
  }

  /** Every process in a pid file is dead (bounded poll). */
  async function pidFileDead(pidFile: string, what: string): Promise<void> {
    await waitFor(() => fileLines(pidFile).map(Number).every((pid) => !pidAlive(pid)), GONE_BOUND_MS,
      `${what}: every per-session child in ${pidFile} to be gone (alive: ${fileLines(pidFile).map(Number).filter(pidAlive).join(', ')})`);
  }

  /** Sessions of every server back to 0 and no per-session child left (idle expiry after DELETE). */
  async function sessionsGone(h: Harness, what: string): Promise<void> {
    const left = () => Object.entries(h.proxy.status()).filter(([, s]) => s.sessions !== 0 || (s.pid === null && s.pids.length !== 0));
    await waitFor(() => left().length === 0, 15_000,
      `${what}: sessions and per-session children back to 0 (left: ${JSON.stringify(left())})`).catch((err) => {
      throw new Error(`${(err as Error).message}; status ${JSON.stringify(h.proxy.status())}`);
    });
  }

  async function deleteSessions(url: string, sids: Iterable<string>): Promise<void> {
    for (const sid of sids) await within(request(url, { method: 'DELETE', headers: { 'mcp-session-id': sid } }), 5_000, 'DELETE');
  }

  async function assertHealthy(h: Harness, what: string): Promise<void> {
    const res = await within(request(`${h.url}/healthz`), 5_000, `healthz after ${what}`);
    assert.equal(res.status, 200, `healthz after ${what}`);
  }

  // ── Raw HTTP over net sockets ──

  type RawAnswer = { status: number; headers: Record<string, string>; bytes: number };

  /**
   * Writes `parts` on a fresh TCP connection (`gapMs` apart), then half-closes it if `halfClose`, or cuts it
   * after `abortMs` if given. Resolves with the first response's status and headers once it is complete (its
   * body in, or for an event stream its headers), status 0 if the connection closed without one, null for a
   * cut exchange; rejects when nothing settled it within timeoutMs (a hang).
   */
  function rawExchange(port: number, parts: Buffer[], opts: { gapMs: number; halfClose: boolean; abortMs?: number; head: boolean }, timeoutMs: number): Promise<RawAnswer | null> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(port, '127.0.0.1');
      let buf = Buffer.alloc(0);
      let done = false;
      const finish = (value: RawAnswer | null, err?: Error) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        socket.destroy();
        if (err) reject(err);
        else resolve(value);
      };
      const timer = setTimeout(() => finish(null, new Error(`no complete answer and no close within ${timeoutMs} ms; got ${JSON.stringify(buf.toString('latin1').slice(0, 300))}`)), timeoutMs);
      const parse = (closed: boolean): RawAnswer | null | undefined => {
        let from = 0;
        for (;;) {
          const cut = buf.indexOf('\r\n\r\n', from);
          if (cut === -1) return closed ? { status: 0, headers: {}, bytes: buf.length } : undefined;
          const headText = buf.subarray(from, cut).toString('latin1');
          const [statusLine = '', ...lines] = headText.split('\r\n');
          const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(statusLine)?.[1] ?? 0);
          if (status === 100) {
            from = cut + 4; // 100 Continue: the real answer follows
            continue;
          }
          const headers: Record<string, string> = {};
          for (const line of lines) {
            const colon = line.indexOf(':');
            if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
          }
          const body = buf.subarray(cut + 4);
          const answer = { status, headers, bytes: buf.length };
          if (closed || opts.head || status === 204 || status === 304 || /^text\/event-stream/.test(headers['content-type'] ?? '')) return answer;
          if (headers['content-length'] !== undefined) return body.length >= Number(headers['content-length']) ? answer : undefined;
          if (/chunked/i.test(headers['transfer-encoding'] ?? '')) return body.includes('0\r\n\r\n') ? answer : undefined;
          return undefined; // until close
        }
      };
      socket.on('data', (chunk: Buffer) => {
        buf = Buffer.concat([buf, chunk]);
        const answer = parse(false);
        if (answer !== undefined) finish(answer);
      });
      socket.on('error', () => {}); // ECONNRESET after the proxy closed: what arrived is the answer
      socket.on('close', () => finish(parse(true) ?? null));
      socket.on('connect', () => {
        let i = 0;
        const next = () => {
          if (done || socket.destroyed) return;
          if (i < parts.length) {
            socket.write(parts[i++]);
            if (opts.gapMs > 0) setTimeout(next, opts.gapMs);
            else next();
          } else if (opts.halfClose) socket.end();
        };
        next();
        if (opts.abortMs !== undefined) setTimeout(() => finish(null), opts.abortMs);
      });
    });
  }

  /** Cuts `bytes` at the given points (deduplicated, in range). */
  function cutAt(bytes: Buffer, cuts: number[]): Buffer[] {
    const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
    const parts: Buffer[] = [];
    let at = 0;
    for (const p of [...points, bytes.length]) {
      if (p > at) parts.push(bytes.subarray(at, p));
      at = p;
    }
    return parts.length > 0 ? parts : [bytes];
  }

  it('raw HTTP over sockets (methods, paths, headers, framings, bodies; Streamable, 2026-07-28 and legacy routes, a shared and a per-session child): only allowed statuses, no hang, no crash, no leaked session, child or heap', { timeout: 60_000 }, async (t) => {
    const pidFile = path.join(tmpDir('fuzz-http'), 'pids');
    const flog = fuzzLog(t);
    const h = await startHarness(
      { servers: [fixture('fix'), fixture('solo', 'ok', { sessions: 'per-session', env: { FIXTURE_PIDFILE: pidFile } })] },
      { limits: FUZZ_LIMITS, log: flog.log },
    );
    onCleanup(t, async () => {
      for (const line of fileLines(pidFile)) h.groups.add(Number(line));
      await h.stop();
    });
    await h.proxy.ready(10_000);
    const port = h.proxy.port;
    const fixPid = h.proxy.status().fix!.pid;
    const seenSids = new Set<string>();

    // Valid pieces the mutations start from.
    const okCall = (id: number, what: Json) => call(id, what);
    const SAFE_WHAT: Json[] = [
      { what: 'echo', text: 'fuzz' }, { what: 'seen' }, { what: 'garbage' }, { what: 'garbage1' }, { what: 'cr', pad: 10 },
      { what: 'deep', depth: 40 }, { what: 'deepnote', depth: 40 }, { what: 'dupid' }, { what: 'spam', count: 3, bytes: 100 },
      { what: 'line', bytes: 40 * KIB }, { what: 'hang' }, { what: 'nope' }, { text: 'no what' },
    ];
    const rpcObject: fc.Arbitrary<Json> = fc.oneof(
      fc.constant(initMsg(1)),
      fc.constantFrom('2024-11-05', '2025-03-26', '2025-06-18', '2025-11-25', '2026-07-28', '1999-01-01', '').map((v) => initMsg('init', v)),
      fc.constant(ping(2)),
      fc.constant({ jsonrpc: '2.0', method: 'notifications/initialized' }),
      fc.constant({ jsonrpc: '2.0', method: 'notifications/cancelled', params: { requestId: 3 } }),
      fc.constant({ jsonrpc: '2.0', id: 'srv-1', result: {} }),
      fc.tuple(fc.integer({ min: 0, max: 1e6 }), fc.constantFrom(...SAFE_WHAT)).map(([id, what]) => okCall(id, what)),
      fc.constantFrom('server/discover', 'tools/list', 'tools/call', 'ping', 'subscriptions/listen').map((m) =>
        modernMsg(7, m, m === 'tools/call' ? { name: 'do', arguments: { what: 'echo', text: 'modern' } } : m === 'subscriptions/listen' ? { notifications: { toolsListChanged: true } } : {})),
      // 2026-07-28 _meta claims that contradict each other or the headers.
      fc.record({ v: fc.constantFrom('2026-07-28', '2025-06-18', 'x', 7 as unknown as string), caps: fc.jsonValue({ maxDepth: 2 }) }).map(({ v, caps }) =>
        modernMsg(8, 'tools/list', {}, { [META_VERSION]: v, [META_CAPS]: caps })),
    );
    const deepBody = fc.tuple(fc.integer({ min: 1, max: 40 }), fc.boolean()).map(([d, arr]) =>
      `{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"do","arguments":{"what":"echo","text":"d"},"x":${arr ? nestedArrays(d) : '{"a":'.repeat(d) + '1' + '}'.repeat(d)}}}`);
    const hugeBody = fc.integer({ min: -300, max: 300 }).map((delta) => {
      const base = JSON.stringify(okCall(10, { what: 'echo', text: '' }));
      return JSON.stringify(okCall(10, { what: 'echo', text: 'h'.repeat(Math.max(0, 64 * KIB - base.length + delta)) }));
    });
    const bodyArb: fc.Arbitrary<Buffer> = fc.oneof(
      { weight: 6, arbitrary: rpcObject.map((m) => Buffer.from(JSON.stringify(m))) },
      { weight: 2, arbitrary: fc.array(rpcObject, { maxLength: 4 }).map((ms) => Buffer.from(JSON.stringify(ms))) },
      { weight: 1, arbitrary: fc.uint8Array({ maxLength: 300 }).map((b) => Buffer.from(b)) },
      { weight: 1, arbitrary: fc.json({ maxDepth: 3 }).map((s) => Buffer.from(s)) },
      { weight: 1, arbitrary: deepBody.map((s) => Buffer.from(s)) },
      { weight: 1, arbitrary: hugeBody.map((s) => Buffer.from(s)) },
      // Valid JSON text with invalid UTF-8 inside a string, or cut short.
      { weight: 1, arbitrary: fc.tuple(rpcObject, fc.nat(), fc.constantFrom('ff', 'c328', 'eda080', 'f4908080', 'c0af')).map(([m, k, bad]) => {
        const s = Buffer.from(JSON.stringify({ ...m, pad: 'pp' }));
        const at = s.indexOf('pp') + 1;
        return k % 2 ? Buffer.concat([s.subarray(0, at), Buffer.from(bad, 'hex'), s.subarray(at)]) : s.subarray(0, k % s.length);
      }) },
      { weight: 1, arbitrary: fc.constant(Buffer.alloc(0)) },
    );

    const pathArb = (ctx: { sid: string; soloSid: string; legacyPath: string }) => fc.oneof(
      { weight: 8, arbitrary: fc.constantFrom('/fix/mcp', '/solo/mcp', ctx.legacyPath, '/fix/sse', '/solo/sse') },
      { weight: 4, arbitrary: fc.constantFrom(
        '/healthz', '/readyz', '/readyz?server=fix', '/readyz?server=%ZZ', '/metrics', '/', '/FIX/mcp', '/fix/../fix/mcp', '/fix/%2e%2e/mcp',
        '/%66ix/mcp', '/fix//mcp', '//fix/mcp', '/fix/mcp/', '/fix/mcp?', '/fix/mcp?sessionId=x', '/fix/mcp#frag', '/fix/messages',
        '/fix/messages?sessionId=', '/fix/messages?sessionId=nope', `${ctx.legacyPath}&sessionId=nope`, '/fix/messages?sessionId=%00',
        'http://127.0.0.1/fix/mcp', 'http://evil.example/fix/mcp', '*', '/fix/mcp%00', '/fix/mcp\u00e9', '/nope/mcp', '/fix/nope',
        '/.well-known/oauth-protected-resource/fix/mcp', '/.well-known/oauth-authorization-server', '/authorize?client_id=x', '/token', '/register',
        '/%', '/%zz', '/..', '/../../etc/passwd', '/fix/%2Fmcp') },
      { weight: 1, arbitrary: fc.tuple(fc.integer({ min: 1, max: 20_000 }), fc.constantFrom('a', '%41', '/', '../')).map(([n, unit]) => `/fix/mcp?x=${unit.repeat(Math.ceil(n / unit.length))}`) },
      { weight: 1, arbitrary: fc.string({ unit: 'grapheme-ascii', maxLength: 40 }).map((s) => '/' + s.replace(/[\s]/g, '')) },
    );
    const methodArb = fc.oneof(
      { weight: 10, arbitrary: fc.constantFrom('GET', 'POST', 'DELETE') },
      { weight: 3, arbitrary: fc.constantFrom('PUT', 'PATCH', 'HEAD', 'OPTIONS', 'TRACE', 'PROPFIND', 'CONNECT', 'get', 'XYZ', 'M-SEARCH', 'POST ') },
    );
    const headerArb = (ctx: { sid: string; soloSid: string }) => {
      const host = `127.0.0.1:${port}`;
      const one = fc.oneof(
        fc.constantFrom('application/json', 'application/json; charset=utf-8', 'APPLICATION/JSON', 'text/plain', 'application/json; charset=latin1',
          'multipart/form-data; boundary=x', '', 'application/jsonx', 'application/x-www-form-urlencoded').map((v) => ['Content-Type', v]),
        fc.constantFrom('application/json, text/event-stream', 'application/json', 'text/event-stream', '*/*', '', 'text/html',
          'application/*;q=0', 'text/event-stream;q=0, application/json').map((v) => ['Accept', v]),
        fc.constantFrom(ctx.sid, ctx.soloSid, 'nope', '', 'x'.repeat(300), ctx.sid.toUpperCase(), `${ctx.sid},${ctx.soloSid}`, '\u00e9\u00e9').map((v) => ['Mcp-Session-Id', v]),
        fc.constantFrom('2025-06-18', '2025-03-26', '2024-11-05', '2025-11-25', '2026-07-28', '1999-01-01', '', 'latest').map((v) => ['MCP-Protocol-Version', v]),
        fc.constantFrom('tools/call', 'tools/list', 'initialize', 'server/discover', '', 'x'.repeat(500)).map((v) => ['Mcp-Method', v]),
        fc.constantFrom('do', '', 'other').map((v) => ['Mcp-Name', v]),
        fc.constantFrom(`http://${host}`, 'http://localhost', 'https://evil.example', 'null', '', 'file://', `http://127.0.0.1:${port + 1}`, 'http://[::1]').map((v) => ['Origin', v]),
        fc.constantFrom('localhost', 'evil.example', '', `127.0.0.1:${port}0`, '[::1]', 'LOCALHOST', '127.0.0.1.', 'a'.repeat(300)).map((v) => ['Host', v]),
        fc.constantFrom('Bearer x', 'Bearer ', 'Basic dXNlcjpwYXNz', 'bearer ' + 'y'.repeat(2_000), '', 'Bearer\tz', 'Token t').map((v) => ['Authorization', v]),
        fc.constantFrom('100-continue', 'nonsense').map((v) => ['Expect', v]),
        fc.constantFrom('keep-alive', 'close', 'upgrade', 'Upgrade, close').map((v) => ['Connection', v]),
        fc.constantFrom('websocket', 'h2c').map((v) => ['Upgrade', v]),
        fc.constantFrom('0', '1', 'nope', '\u00ff').map((v) => ['Last-Event-ID', v]),
        fc.constantFrom('5', '-1', 'abc', '99999999999999999999').map((v) => ['Content-Length', v]),
        fc.constantFrom('gzip', 'chunked, gzip', 'identity').map((v) => ['Transfer-Encoding', v]),
        fc.constantFrom('for=1.2.3.4', '1.2.3.4').map((v) => ['X-Forwarded-For', v]),
        fc.tuple(fc.stringMatching(/^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}$/), fc.string({ unit: 'grapheme-ascii', maxLength: 40 })).map(([k, v]) => [k, v.replace(/[\r\n]/g, '')]),
      ) as fc.Arbitrary<[string, string]>;
      // What Node's parser must refuse: a bare LF or NUL inside a value, a name with a space, obs-fold.
      const bad = fc.constantFrom(['X-Bad', 'a\nb'], ['X-Bad', 'a\u0000b'], ['Bad Name', 'v'], ['X-Fold', 'a\r\n b']) as fc.Arbitrary<[string, string]>;
      return fc.oneof(
        { weight: 12, arbitrary: fc.array(one, { maxLength: 4 }) },
        { weight: 1, arbitrary: fc.tuple(fc.array(one, { maxLength: 3 }), bad).map(([hs, b]) => [...hs, b]) },
        { weight: 1, arbitrary: fc.integer({ min: 90, max: 130 }).map((n) => Array.from({ length: n }, (_, i) => [`X-Many-${i}`, 'v'] as [string, string])) },
        { weight: 1, arbitrary: fc.constant([['X-Big', 'b'.repeat(20 * KIB)] as [string, string]]) },
      );
    };
    const framingArb = fc.oneof(
      { weight: 12, arbitrary: fc.constant('length') }, { weight: 3, arbitrary: fc.constant('chunked') },
      { weight: 1, arbitrary: fc.constantFrom('none', 'short', 'long', 'both') },
    );
    const versionArb = fc.oneof(
      { weight: 16, arbitrary: fc.constant('HTTP/1.1') }, { weight: 2, arbitrary: fc.constant('HTTP/1.0') },
      { weight: 1, arbitrary: fc.constantFrom('HTTP/2.0', 'HTTP/1.1 x', 'HTTP/9.9', 'HTTX/1.1', '') },
    );

    /** A legacy session held open for the round; its POST path goes into the paths fuzzed. */
    async function roundContext(): Promise<{ sid: string; soloSid: string; legacyPath: string; close(): void }> {
      const sid = await rawSession(h.url, 'fix');
      const soloSid = await rawSession(h.url, 'solo');
      const legacy = await legacySession(h.url, 'fix');
      return { sid, soloSid, legacyPath: legacy.endpoint.slice(h.url.length), close: () => legacy.stream.close() };
    }

    let n = 0;
    const zeroes: string[] = [];
    const statuses = new Map<string, number>();
    const round = async (offset: number, numRuns: number, budgetMs: number): Promise<number> => {
      const ctx = await roundContext();
      seenSids.add(ctx.sid);
      seenSids.add(ctx.soloSid);
      let runs = 0;
      try {
        await fuzz('raw HTTP', offset, numRuns, budgetMs, (params) => fc.assert(
          fc.asyncProperty(
            methodArb, pathArb(ctx), versionArb, headerArb(ctx), fc.integer({ min: 0, max: 19 }).map((k) => k > 0), fc.integer({ min: 0, max: 9 }).map((k) => k > 1), bodyArb, framingArb,
            fc.array(fc.nat({ max: 100_000 }), { maxLength: 4 }), fc.constantFrom(0, 0, 0, 5),
            fc.option(fc.integer({ min: 0, max: 80 }), { freq: 8 }),
            tracked(async (method, target, version, extra, withHost, jsonHeaders, body, framing, cuts, gapMs, abortMs) => {
              runs++;
              const tag = ++n;
              const headers: [string, string][] = [];
              if (withHost) headers.push(['Host', `127.0.0.1:${port}`]);
              if (jsonHeaders) headers.push(['Content-Type', 'application/json'], ['Accept', 'application/json, text/event-stream']);
              headers.push(...extra);
              const sendsBody = framing !== 'none' || method !== 'GET';
              let payload = body;
              if (framing === 'length') headers.push(['Content-Length', String(body.length)]);
              if (framing === 'short') headers.push(['Content-Length', String(Math.max(0, body.length - 3))]);
              if (framing === 'long') headers.push(['Content-Length', String(body.length + 10)]);
              if (framing === 'both') headers.push(['Content-Length', String(body.length)], ['Transfer-Encoding', 'chunked']);
              if (framing === 'chunked' || framing === 'both') {
                headers.push(['Transfer-Encoding', 'chunked']);
                const chunks = cutAt(body, cuts).map((c) => Buffer.concat([Buffer.from(`${c.length.toString(16)}\r\n`), c, Buffer.from('\r\n')]));
                payload = Buffer.concat([...chunks.filter((c) => !c.subarray(0, 3).equals(Buffer.from('0\r\n'))), Buffer.from('0\r\n\r\n')]);
              }
              const head = Buffer.from(`${method} ${target} ${version}\r\n${headers.map(([k, v]) => `${k}: ${v}\r\n`).join('')}\r\n`, 'latin1');
              const bytes = sendsBody ? Buffer.concat([head, payload]) : head;
              const what = `#${tag} ${method} ${target.slice(0, 120)} ${version} [${headers.map(([k, v]) => `${k}: ${v.slice(0, 60)}`).join(' | ').slice(0, 600)}] ` +
                `${framing} body ${JSON.stringify(body.toString('latin1').slice(0, 200))}${abortMs === null ? '' : ` cut after ${abortMs} ms`}`;
              // A body shorter than announced: half-close, so the proxy sees the end instead of waiting for bytes.
              const answer = await rawExchange(port, cutAt(bytes, cuts), { gapMs, halfClose: framing === 'long', abortMs: abortMs ?? undefined, head: method === 'HEAD' }, EXCHANGE_MS)
                .catch((err: Error) => assert.fail(`hang: ${what}: ${err.message}`));
              const key = answer === null ? 'cut' : String(answer.status);
              statuses.set(key, (statuses.get(key) ?? 0) + 1);
              if (answer) {
                const sid = answer.headers['mcp-session-id'];
                if (sid) seenSids.add(sid);
                if (answer.status === 0) {
                  // Node closes a CONNECT (no 'connect' listener) and a half-closed request without a word.
                  if (method !== 'CONNECT' && framing !== 'long') zeroes.push(what);
                } else assertAllowed(answer.status, answer.headers, what, target);
              }
              await assertHealthy(h, what);
            }),
          ),
          params,
        ));
      } finally {
        ctx.close();
      }
      // A real call on each child after the round.
      const fresh = await rawSession(h.url, 'fix');
      const freshSolo = await rawSession(h.url, 'solo');
      for (const [name, sid] of [['fix', fresh], ['solo', freshSolo]] as const) {
        const res = await within(post(`${h.url}/${name}/mcp`, call('real', { what: 'echo', text: `real ${name}` }), sessionHeaders(sid)), 5_000, `a real call on ${name}`);
        assert.equal(res.status, 200, res.text);
        assert.equal(textOf(onlyMessage(res).result), `real ${name}`);
      }
      seenSids.add(fresh);
      seenSids.add(freshSolo);
      return runs;
    };
    const settle = async () => {
      await deleteSessions(`${h.url}/fix/mcp`, seenSids);
      await deleteSessions(`${h.url}/solo/mcp`, seenSids);
      seenSids.clear();
      await sessionsGone(h, 'raw HTTP');
      await pidFileDead(pidFile, 'raw HTTP');
    };
    await warmThenMain(t, round, settle, { warm: 60, main: 1_000, warmMs: 3_000, mainMs: 10_000 });
    t.diagnostic(`statuses: ${[...statuses].sort().map(([k, v]) => `${k} ×${v}`).join(', ')}`);
    assert.deepEqual(zeroes, [], 'complete requests the proxy closed without an answer');
    assert.equal(h.proxy.status().fix!.pid, fixPid, 'no input restarted the shared child');
    assert.equal(h.proxy.status().fix!.restarts, 0);
    flog.assertNoInternalError();
  });

  // ── JSON-RPC mutations against server-everything ──

  /** Sets (or with `value === DELETE` removes) `path` in `msg`, making containers on the way; own keys even for "__proto__". */
  const DELETE = Symbol('delete');
  function mutateAt(msg: Json, keys: string[], value: unknown): Json {
    const root: Json = msg !== null && typeof msg === 'object' && !Array.isArray(msg) ? msg : {};
    let at: Json = root;
    for (const k of keys.slice(0, -1)) {
      if (at[k] === null || typeof at[k] !== 'object' || !Object.prototype.hasOwnProperty.call(at, k)) {
        Object.defineProperty(at, k, { value: {}, enumerable: true, writable: true, configurable: true });
      }
      at = at[k];
    }
    const last = keys[keys.length - 1]!;
    if (value === DELETE) delete at[last];
    else Object.defineProperty(at, last, { value, enumerable: true, writable: true, configurable: true });
    return root;
  }

  const oddValue: fc.Arbitrary<unknown> = fc.oneof(
    fc.constantFrom(null, true, false, 0, -1, 1.5, -0, 1e308, 2 ** 53 + 1, '', ' ', '__proto__', 'constructor', 'toString', '\u0000', '\ud800',
      [], {}, [null], { id: 1 }, 'notifications/initialized', 'tools/call', 'initialize'),
    fc.jsonValue({ maxDepth: 3 }),
    fc.string({ unit: 'binary', maxLength: 16 }),
    fc.integer({ min: 1, max: 5_000 }).map((k) => 'L'.repeat(k)),
    fc.integer({ min: 1, max: 40 }).map((d) => JSON.parse(nestedArrays(d))),
  );
  const methodValue: fc.Arbitrary<unknown> = fc.oneof(
    fc.constantFrom('TOOLS/CALL', 'tools/call ', 'tools/', 'rpc.discover', 'notifications/x', 'initialize', 'sampling/createMessage', 'roots/list',
      'elicitation/create', 'logging/setLevel', 'completion/complete', 'server/discover', 'resources/subscribe', 'resources/unsubscribe', 'ping',
      'notifications/cancelled', 'notifications/progress', 'notifications/initialized', 'notifications/roots/list_changed', '$/cancelRequest'),
    oddValue,
  );
  const mutationArb = fc.oneof(
    fc.tuple(fc.constantFrom(['id'], ['jsonrpc'], ['params'], ['result'], ['error']), fc.oneof(oddValue, fc.constant(DELETE))),
    fc.tuple(fc.constant(['method']), fc.oneof(methodValue, fc.constant(DELETE))),
    fc.tuple(fc.constantFrom('name', 'arguments', 'uri', 'protocolVersion', 'capabilities', 'clientInfo', 'level', 'requestId', 'progressToken', 'cursor', 'ref', 'argument')
      .map((k) => ['params', k]), fc.oneof(oddValue, fc.constant(DELETE))),
    fc.tuple(fc.constantFrom('message', 'a', 'b', 'duration', 'steps', 'prompt', 'maxTokens', 'messageType', 'includeImage', 'location', 'resourceId')
      .map((k) => ['params', 'arguments', k]), oddValue),
    fc.tuple(fc.constantFrom('progressToken', META_VERSION, META_CAPS, META_CLIENT_INFO, 'io.modelcontextprotocol/subscriptionId', 'x')
      .map((k) => ['params', '_meta', k]), fc.oneof(oddValue, fc.constantFrom(MODERN, '2025-06-18', '2024-11-05'), fc.constant(DELETE))),
    fc.tuple(fc.string({ maxLength: 8 }).map((k) => [k]), oddValue),
  ) as fc.Arbitrary<[string[], unknown]>;

  const EVERYTHING_CALLS: Json[] = [
    { name: 'echo', arguments: { message: 'fuzz' } }, { name: 'get-sum', arguments: { a: 1, b: 2 } }, { name: 'get-tiny-image', arguments: {} },
    { name: 'get-structured-content', arguments: { location: 'New York' } }, { name: 'get-annotated-message', arguments: { messageType: 'error', includeImage: false } },
    { name: 'get-resource-links', arguments: { count: 2 } }, { name: 'get-resource-reference', arguments: { resourceType: 'Text', resourceId: 1 } },
    { name: 'trigger-long-running-operation', arguments: { duration: 1, steps: 2 }, _meta: { progressToken: 'p' } },
    { name: 'trigger-sampling-request', arguments: { prompt: 'x', maxTokens: 5 } }, { name: 'toggle-simulated-logging', arguments: {} },
    { name: 'no-such-tool', arguments: {} },
  ];
  const EVERYTHING_BASE: Json[] = [
    initMsg(1),
    { jsonrpc: '2.0', id: 1, method: 'ping' },
    { jsonrpc: '2.0', id: 1, method: 'tools/list', params: {} },
    ...EVERYTHING_CALLS.map((params) => ({ jsonrpc: '2.0', id: 1, method: 'tools/call', params })),
    { jsonrpc: '2.0', id: 1, method: 'resources/list', params: {} },
    { jsonrpc: '2.0', id: 1, method: 'resources/templates/list', params: {} },
    { jsonrpc: '2.0', id: 1, method: 'resources/read', params: { uri: 'demo://resource/dynamic/text/1' } },
    { jsonrpc: '2.0', id: 1, method: 'resources/subscribe', params: { uri: 'demo://resource/dynamic/text/1' } },
    { jsonrpc: '2.0', id: 1, method: 'resources/unsubscribe', params: { uri: 'demo://resource/dynamic/text/1' } },
    { jsonrpc: '2.0', id: 1, method: 'prompts/list', params: {} },
    { jsonrpc: '2.0', id: 1, method: 'prompts/get', params: { name: 'simple-prompt' } },
    { jsonrpc: '2.0', id: 1, method: 'logging/setLevel', params: { level: 'debug' } },
    { jsonrpc: '2.0', id: 1, method: 'completion/complete', params: { ref: { type: 'ref/prompt', name: 'complex-prompt' }, argument: { name: 'temperature', value: '1' } } },
    { jsonrpc: '2.0', id: 1, method: 'server/discover', params: {} },
    { jsonrpc: '2.0', method: 'notifications/initialized' },
    { jsonrpc: '2.0', method: 'notifications/cancelled', params: { requestId: 1, reason: 'fuzz' } },
    { jsonrpc: '2.0', method: 'notifications/progress', params: { progressToken: 'p', progress: 1 } },
    { jsonrpc: '2.0', method: 'notifications/roots/list_changed' },
    { jsonrpc: '2.0', id: 'srv-1', result: {} },
    { jsonrpc: '2.0', id: 7, error: { code: -1, message: 'x' } },
  ];
  type Transport = 'mcp' | 'mcp-nosession' | 'modern' | 'legacy' | 'solo-mcp' | 'solo-legacy' | 'solo-nosession';
  const transportArb: fc.Arbitrary<Transport> = fc.oneof(
    { weight: 4, arbitrary: fc.constant('mcp' as const) }, { weight: 1, arbitrary: fc.constant('mcp-nosession' as const) },
    { weight: 3, arbitrary: fc.constant('modern' as const) }, { weight: 3, arbitrary: fc.constant('legacy' as const) },
    { weight: 3, arbitrary: fc.constant('solo-mcp' as const) }, { weight: 2, arbitrary: fc.constant('solo-legacy' as const) },
    { weight: 1, arbitrary: fc.constant('solo-nosession' as const) },
  );
  /** One mutated message (an object, usually; a mutation may turn it into anything JSON). */
  const mutatedMessage = fc.tuple(fc.constantFrom(...EVERYTHING_BASE), fc.integer({ min: 0, max: 1e9 }), fc.oneof(fc.constant([] as [string[], unknown][]), fc.array(mutationArb, { minLength: 1, maxLength: 2 }), fc.array(mutationArb, { minLength: 1, maxLength: 2 })), fc.boolean())
    .map(([base, id, mutations, modern]) => {
      let msg: Json = JSON.parse(JSON.stringify(base));
      if ('id' in msg) msg.id = id;
      if (modern && typeof msg.method === 'string') msg = modernMsg(msg.id, msg.method, msg.params ?? {});
      for (const [keys, value] of mutations) msg = mutateAt(msg, keys, value);
      return msg;
    });
  /** The body text: the message as JSON, or a batch of them, or that text damaged. */
  const mutatedBody = fc.tuple(
    fc.oneof({ weight: 6, arbitrary: mutatedMessage.map((m) => [m]) }, { weight: 1, arbitrary: fc.array(mutatedMessage, { maxLength: 4 }).map((ms) => ms) }),
    fc.boolean(),
    fc.constantFrom('none', 'none', 'none', 'none', 'none', 'none', 'truncate', 'byte', 'dupid', 'utf8', 'bom'),
    fc.nat(),
    fc.integer({ min: 0, max: 255 }),
  ).map(([msgs, asBatch, damage, k, byte]) => {
    const text = Buffer.from(msgs.length === 1 && !asBatch ? JSON.stringify(msgs[0]) : JSON.stringify(msgs));
    const at = k % (text.length + 1);
    switch (damage) {
      case 'truncate': return { msgs, body: text.subarray(0, at) };
      case 'byte': return { msgs, body: Buffer.concat([text.subarray(0, at), Buffer.from([byte]), text.subarray(at)]) };
      case 'dupid': return { msgs, body: text[0] === 0x7b ? Buffer.concat([Buffer.from(`{"id":${k},`), text.subarray(1)]) : text };
      case 'utf8': return { msgs, body: Buffer.concat([text.subarray(0, at), Buffer.from([0xff, 0xc3, 0x28]), text.subarray(at)]) };
      case 'bom': return { msgs, body: Buffer.concat([Buffer.from('\ufeff'), text]) };
      default: return { msgs, body: text };
    }
  });

  /** POST `body` to `url` and read the whole answer (event streams end with the request's answer). */
  function postBytes(url: string, body: Buffer, headers: Record<string, string>): Promise<RawResponse> {
    return request(url, { method: 'POST', headers, body });
  }

  /** The JSON-RPC messages of a 200 answer: it must be well-formed whatever the input was. */
  function answerMessages(res: RawResponse, what: string): Json[] {
    try {
      return messages(res);
    } catch (err) {
      assert.fail(`${what}: a ${res.status} answer whose body is not JSON-RPC (${(err as Error).message}): ${res.text.slice(0, 300)}`);
    }
  }

  it('mutated JSON-RPC to server-everything (shared and per-session) on Streamable HTTP, 2026-07-28 and legacy HTTP+SSE: allowed statuses, well-formed answers, no hang, no crash, no leaked session, child or heap', { timeout: 60_000 }, async (t) => {
    const flog = fuzzLog(t);
    const h = await harness(t, { servers: [everything('everything'), srv('evsolo', [EVERYTHING, 'stdio'], { sessions: 'per-session' })] },
      // sessionIdleMs above server-everything's start-up (1-2 s here): a session whose child is still starting is
      // expired as idle under its own initialize (a defect, tested on its own below).
      { limits: { ...FUZZ_LIMITS, sessionIdleMs: 5_000 }, log: flog.log });
    await h.proxy.ready(15_000);
    const evPid = h.proxy.status().everything!.pid;
    const seenSids = new Set<string>();
    const statuses = new Map<string, number>();
    let n = 0;

    const round = async (offset: number, numRuns: number, budgetMs: number): Promise<number> => {
      const sid = await rawSession(h.url, 'everything');
      const soloSid = await rawSession(h.url, 'evsolo');
      const legacy = await legacySession(h.url, 'everything');
      const soloLegacy = await legacySession(h.url, 'evsolo');
      for (const s of [sid, soloSid]) seenSids.add(s);
      let runs = 0;
      try {
        await fuzz('mutated JSON-RPC', offset, numRuns, budgetMs, (params) => fc.assert(
          fc.asyncProperty(transportArb, mutatedBody, fc.boolean(), fc.constantFrom('keep', 'keep', 'drop', 'other'), tracked(async (transport, { msgs, body }, sseAccept, methodHeader) => {
            runs++;
            const tag = ++n;
            const accept = sseAccept ? 'application/json, text/event-stream' : 'application/json';
            const first = msgs[0];
            let url = `${h.url}/everything/mcp`;
            let headers: Record<string, string> = { 'content-type': 'application/json', accept };
            if (transport === 'mcp') headers = { ...headers, ...sessionHeaders(sid, { accept }) };
            else if (transport === 'solo-mcp') (url = `${h.url}/evsolo/mcp`), (headers = { ...headers, ...sessionHeaders(soloSid, { accept }) });
            else if (transport === 'solo-nosession') url = `${h.url}/evsolo/mcp`;
            else if (transport === 'legacy') url = legacy.endpoint;
            else if (transport === 'solo-legacy') url = soloLegacy.endpoint;
            else if (transport === 'modern') {
              const method = first !== null && typeof first === 'object' && typeof first.method === 'string' ? first.method : undefined;
              headers = { ...headers, 'mcp-protocol-version': MODERN };
              if (method !== undefined && methodHeader !== 'drop') Object.assign(headers, modernHeaders(first));
              if (methodHeader === 'other') headers['mcp-method'] = 'tools/list';
            }
            for (const [k, v] of Object.entries(headers)) if (/[^\t\x20-\x7e\x80-\xff]/.test(v)) delete headers[k]; // node:http refuses to send them
            const what = `#${tag} ${transport} ${JSON.stringify(headers)} ${JSON.stringify(body.toString('latin1').slice(0, 400))}`;
            const res = await within(postBytes(url, body, headers), EXCHANGE_MS, `answer to ${what}`);
            statuses.set(`${transport} ${res.status}`, (statuses.get(`${transport} ${res.status}`) ?? 0) + 1);
            assertAllowed(res.status, res.headers, `${what} → ${res.status} ${res.text.slice(0, 300)}`);
            const newSid = res.headers['mcp-session-id'];
            if (typeof newSid === 'string') seenSids.add(newSid);
            if (res.status === 200) for (const m of answerMessages(res, what)) assert.equal(m.jsonrpc, '2.0', `${what}: ${res.text.slice(0, 300)}`);
            else if (res.status >= 400 && res.text !== '') {
              const err = answerMessages(res, what)[0];
              assert.ok(Number.isInteger(err?.error?.code), `${what}: a ${res.status} whose body is not a JSON-RPC error: ${res.text.slice(0, 300)}`);
            }
            await assertHealthy(h, what);
          })),
          params,
        ));
        // Whatever the streams carried parsed as JSON-RPC.
        for (const s of [legacy.stream, soloLegacy.stream]) {
          for (const e of s.events.filter((ev) => ev.event === 'message')) assert.doesNotThrow(() => JSON.parse(e.data), `legacy stream event ${e.data.slice(0, 200)}`);
        }
        // Real calls afterwards: the raw legacy sessions, a fresh raw session per server, an SDK client on each transport.
        for (const [l, name] of [[legacy, 'everything'], [soloLegacy, 'evsolo']] as const) {
          assert.equal((await l.send({ jsonrpc: '2.0', id: `real-${offset}`, method: 'tools/call', params: { name: 'echo', arguments: { message: 'legacy' } } })).status, 202);
          const answer = await l.answer(`real-${offset}`, EXCHANGE_MS);
          assert.equal(textOf(answer.result), 'Echo: legacy', `${name}: ${JSON.stringify(answer)}`);
        }
        for (const name of ['everything', 'evsolo']) {
          const fresh = await rawSession(h.url, name);
          seenSids.add(fresh);
          const res = await within(post(`${h.url}/${name}/mcp`, { jsonrpc: '2.0', id: 'real', method: 'tools/call', params: { name: 'echo', arguments: { message: 'raw' } } }, sessionHeaders(fresh)), EXCHANGE_MS, 'real call');
          assert.equal(textOf(onlyMessage(res).result), 'Echo: raw', res.text);
        }
        for (const kind of ['mcp', 'sse'] as const) {
          const client = await within(h.client('everything', kind), EXCHANGE_MS, `SDK ${kind} client`);
          const result = await client.callTool({ name: 'echo', arguments: { message: kind } });
          assert.equal(textOf(result), `Echo: ${kind}`);
          await client.close();
        }
      } finally {
        legacy.stream.close();
        soloLegacy.stream.close();
      }
      return runs;
    };
    const settle = async () => {
      for (const name of ['everything', 'evsolo']) await deleteSessions(`${h.url}/${name}/mcp`, seenSids);
      seenSids.clear();
      await sessionsGone(h, 'mutated JSON-RPC');
    };
    await warmThenMain(t, round, settle, { warm: 40, main: 1_000, warmMs: 3_000, mainMs: 8_000 });
    t.diagnostic(`statuses: ${[...statuses].sort().map(([k, v]) => `${k} ×${v}`).join(', ')}`);
    assert.equal(h.proxy.status().everything!.pid, evPid, 'no input restarted the shared child');
    flog.assertNoInternalError();
  });

  // ── A child whose every answer is mutated ──

  // A stdio MCP server that answers initialize, ping and tools/list properly and each tools/call with the bytes
  // the call asks for: arguments.writes (base64; "@ID@" replaced by the JSON of the call's id, "@Z<n>@" by n z's) written one by
  // one, arguments.gapMs (at most 50) apart. Calls are served in order, so one call's writes never interleave
  // with the next one's.
  const MUTANT = String.raw`
'use strict';
const fs = require('node:fs');
if (process.env.FIXTURE_PIDFILE) fs.appendFileSync(process.env.FIXTURE_PIDFILE, process.pid + '\n');
const send = (m) => process.stdout.write(JSON.stringify(m) + '\n');
${STDIN_LINES}
process.stdin.on('end', () => process.exit(0));
const ID = Buffer.from('@ID@');
function replaceId(buf, idText) {
  const out = [];
  let at = 0;
  for (let i; (i = buf.indexOf(ID, at)) !== -1; at = i + ID.length) out.push(buf.subarray(at, i), idText);
  out.push(buf.subarray(at));
  // "@Z<n>@": n bytes of z (a huge line without a huge request).
  return Buffer.from(Buffer.concat(out).toString('latin1').replace(/@Z(\d+)@/g, (m, k) => 'z'.repeat(Number(k))), 'latin1');
}
let queue = Promise.resolve();
function onMessage(msg) {
  if (msg.id === undefined || typeof msg.method !== 'string') return;
  if (msg.method === 'initialize') {
    const v = msg.params && typeof msg.params.protocolVersion === 'string' ? msg.params.protocolVersion : '2025-06-18';
    return send({ jsonrpc: '2.0', id: msg.id, result: { protocolVersion: v, capabilities: { tools: {}, logging: {} }, serverInfo: { name: 'mutant', version: '1.0.0' } } });
  }
  if (msg.method === 'ping') return send({ jsonrpc: '2.0', id: msg.id, result: {} });
  if (msg.method === 'tools/list') return send({ jsonrpc: '2.0', id: msg.id, result: { tools: [{ name: 'out', inputSchema: { type: 'object' } }] } });
  if (msg.method !== 'tools/call') return send({ jsonrpc: '2.0', id: msg.id, error: { code: -32601, message: 'Method not found' } });
  const a = (msg.params && msg.params.arguments) || {};
  const idText = Buffer.from(JSON.stringify(msg.id));
  const parts = (Array.isArray(a.writes) ? a.writes : []).map((b) => replaceId(Buffer.from(String(b), 'base64'), idText));
  const gap = Math.min(Math.max(Number(a.gapMs) || 0, 0), 50);
  queue = queue.then(() => new Promise((done) => {
    let i = 0;
    const next = () => {
      if (i >= parts.length) return done();
      process.stdout.write(parts[i++]);
      if (gap > 0) setTimeout(next, gap);
      else next();
    };
    next();
  }));
}
`;

  const okLine = (text: string) => `{"jsonrpc":"2.0","id":@ID@,"result":{"content":[{"type":"text","text":${JSON.stringify(text)}}]}}`;
  /** Ids no request of the proxy's carries (it numbers its own from small positive integers). */
  const foreignId = fc.constantFrom('"nope"', '-5', '9007199254740991', '0.5', '"@ID@"', '[@ID@]', '{"v":@ID@}', 'null', 'true', '"1"');
  const oddJson = fc.oneof(fc.jsonValue({ maxDepth: 2 }).map((v) => JSON.stringify(v) ?? 'null'), fc.constantFrom('null', '[]', '{}', '"\\u0000"', '1e999'));
  /** One line of child output (without its newline), damaged or odd in one of the ways a child can be. */
  const childLine: fc.Arbitrary<Buffer> = fc.oneof(
    { weight: 3, arbitrary: fc.constant(Buffer.from(okLine('ok'))) },
    // Garbage: random bytes, text, an empty line, a bare CR.
    { weight: 1, arbitrary: fc.uint8Array({ maxLength: 120 }).map((b) => Buffer.from(b.filter((x) => x !== 0x0a))) },
    { weight: 1, arbitrary: fc.string({ unit: 'grapheme', maxLength: 30 }).map((s) => Buffer.from(s.replace(/\n/g, ''))) },
    { weight: 1, arbitrary: fc.constantFrom('', '\r', ' ', '[]', '{}', '[1,2', '"str"', 'null', '{"jsonrpc":"2.0"}').map((s) => Buffer.from(s)) },
    // Truncated JSON (the answer cut anywhere).
    { weight: 2, arbitrary: fc.nat().map((k) => { const s = okLine('cut'); return Buffer.from(s.slice(0, k % s.length)); }) },
    // Wrong ids.
    { weight: 2, arbitrary: foreignId.map((id) => Buffer.from(`{"jsonrpc":"2.0","id":${id},"result":{"content":[]}}`)) },
    // Huge (around and over maxLineBytes, 32 KiB) and nested (around maxJsonDepth, 32).
    { weight: 1, arbitrary: fc.integer({ min: 30 * KIB, max: 70 * KIB }).map((bytes) => Buffer.from(okLine(`@Z${bytes}@`))) },
    { weight: 1, arbitrary: fc.tuple(fc.integer({ min: 1, max: 60 }), fc.boolean()).map(([d, answer]) =>
      Buffer.from(answer ? `{"jsonrpc":"2.0","id":@ID@,"result":{"content":[],"deep":${nestedArrays(d)}}}`
        : `{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":${nestedArrays(d)}}}`)) },
    // Invalid UTF-8 inside a string, and control characters raw (invalid JSON) or escaped (valid).
    { weight: 1, arbitrary: fc.constantFrom('ff', 'c328', 'eda080', 'f4908080', 'c0af', 'e282').map((hex) => {
      const [a, b] = okLine('X').split('X');
      return Buffer.concat([Buffer.from(a!), Buffer.from(hex, 'hex'), Buffer.from(b!)]);
    }) },
    { weight: 1, arbitrary: fc.tuple(fc.integer({ min: 0, max: 31 }).filter((c) => c !== 10), fc.boolean()).map(([c, raw]) =>
      Buffer.from(raw ? okLine('c').replace('"c"', `"c${String.fromCharCode(c)}"`) : okLine(`c${String.fromCharCode(c)}\u001b[2K\u0085\u2028`))) },
    // Answers of odd shape under the right id: no result nor error, both, a malformed error, a non-object result, a batch.
    { weight: 2, arbitrary: fc.constantFrom(
      '{"jsonrpc":"2.0","id":@ID@}', '{"jsonrpc":"2.0","id":@ID@,"result":null}', '{"jsonrpc":"2.0","id":@ID@,"result":7}',
      '{"jsonrpc":"2.0","id":@ID@,"result":{},"error":{"code":1,"message":"both"}}', '{"jsonrpc":"2.0","id":@ID@,"error":{"code":"x"}}',
      '{"jsonrpc":"2.0","id":@ID@,"error":null}', '{"id":@ID@,"result":{}}', '{"jsonrpc":"1.0","id":@ID@,"result":{}}',
      '[{"jsonrpc":"2.0","id":@ID@,"result":{}}]', '[]', '{"jsonrpc":"2.0","id":@ID@,"result":{"content":"no array"}}',
      '{"jsonrpc":"2.0","id":@ID@,"id":"dup","result":{}}',
    ).map((s) => Buffer.from(s)) },
    // Notifications with odd methods and params.
    { weight: 2, arbitrary: fc.tuple(fc.oneof(fc.constantFrom('"notifications/progress"', '"notifications/cancelled"', '"notifications/message"',
      '"notifications/resources/updated"', '"notifications/tools/list_changed"', '"notifications/initialized"', '""', '123', 'null', '"__proto__"'),
    fc.string({ maxLength: 20 }).map((s) => JSON.stringify(s))), oddJson, fc.constantFrom('progressToken', 'requestId', 'level', 'uri', 'x')).map(([m, v, k]) =>
      Buffer.from(`{"jsonrpc":"2.0","method":${m},"params":{"${k}":${v},"progress":1,"data":${v}}}`)) },
    // Requests to the client with odd ids, methods and params.
    { weight: 2, arbitrary: fc.tuple(fc.oneof(foreignId, fc.integer().map(String), fc.constant('@ID@')),
      fc.constantFrom('"sampling/createMessage"', '"roots/list"', '"elicitation/create"', '"ping"', '"tools/call"', '"x/y"', '""', '7'), oddJson).map(([id, m, p]) =>
      Buffer.from(`{"jsonrpc":"2.0","id":${id},"method":${m},"params":${p}}`)) },
  );
  /** Several lines, each with its newline, cut into writes at random points (a line split across writes). */
  const childOutput = fc.tuple(fc.array(childLine, { minLength: 1, maxLength: 5 }), fc.integer({ min: 0, max: 6 }), fc.array(fc.nat({ max: 200_000 }), { maxLength: 4 }), fc.constantFrom(0, 0, 0, 3, 15))
    .map(([mutated, last, cuts, gapMs]) => {
      // Mostly a good answer last (it must get through unless a line before settled the call); else none, and
      // the call ends by requestTimeoutMs.
      const lines = last > 0 ? [...mutated, Buffer.from(okLine('last'))] : mutated;
      const bytes = Buffer.concat(lines.flatMap((l) => [l, Buffer.from('\n')]));
      // Never cut inside an "@Z<n>@" placeholder (the child expands it per write).
      const text = bytes.toString('latin1');
      const holes = [...text.matchAll(/@Z\d+@/g)].map((m) => [m.index!, m.index! + m[0].length] as const);
      const safeCuts = cuts.map((c) => c % (bytes.length + 1)).map((c) => holes.find(([a, b]) => c > a && c < b)?.[1] ?? c);
      return { lines, writes: cutAt(bytes, safeCuts).map((b) => b.toString('base64')), gapMs };
    });

  it('a child whose answers are mutated (garbage, truncated, wrong ids, huge, nested, invalid UTF-8, control characters, split writes, odd notifications and requests): each call gets one answer or error in time, other sessions keep being served, no crash, no leak', { timeout: 60_000 }, async (t) => {
    const pidFile = path.join(tmpDir('fuzz-child'), 'pids');
    const flog = fuzzLog(t);
    const h = await startHarness(
      { servers: [srv('mut', ['-e', MUTANT]), srv('mutsolo', ['-e', MUTANT], { sessions: 'per-session', env: { FIXTURE_PIDFILE: pidFile } })] },
      { limits: { ...FUZZ_LIMITS, requestTimeoutMs: 500 }, log: flog.log },
    );
    onCleanup(t, async () => {
      for (const line of fileLines(pidFile)) h.groups.add(Number(line));
      await h.stop();
    });
    await h.proxy.ready(10_000);
    const mutPid = h.proxy.status().mut!.pid;
    const seenSids = new Set<string>();
    const outcomes = new Map<string, number>();
    let n = 0;
    const callOut = (id: string, out: { writes: string[]; gapMs: number }) => ({ jsonrpc: '2.0', id, method: 'tools/call', params: { name: 'out', arguments: out } });
    const okOut = { writes: [Buffer.from(okLine('bystander') + '\n').toString('base64')], gapMs: 0 };

    const round = async (offset: number, numRuns: number, budgetMs: number): Promise<number> => {
      const sid = await rawSession(h.url, 'mut');
      const bystander = await rawSession(h.url, 'mut');
      const soloSid = await rawSession(h.url, 'mutsolo');
      const legacy = await legacySession(h.url, 'mut');
      // A GET stream on the Streamable session: where the child's requests and notifications go.
      const get = await openRpcStream(`${h.url}/mut/mcp`, { headers: { ...sessionHeaders(sid), accept: 'text/event-stream' } });
      // …and on the per-session one, which would otherwise idle out (1.5 s) between the inputs that use it.
      const soloGet = await openRpcStream(`${h.url}/mutsolo/mcp`, { headers: { ...sessionHeaders(soloSid), accept: 'text/event-stream' } });
      for (const s of [sid, bystander, soloSid]) seenSids.add(s);
      let runs = 0;
      try {
        await fuzz('mutated child output', offset, numRuns, budgetMs, (params) => fc.assert(
          fc.asyncProperty(fc.constantFrom('mcp-json', 'mcp-sse', 'legacy', 'solo'), childOutput, tracked(async (transport, out) => {
            runs++;
            const id = `m-${++n}`;
            const what = `#${n} ${transport} lines ${JSON.stringify(out.lines.map((l) => l.toString('latin1').slice(0, 150)))} gap ${out.gapMs} ms, ${out.writes.length} writes`;
            let answer: Json;
            if (transport === 'legacy') {
              const from = legacy.stream.events.length;
              const res = await within(post(legacy.endpoint, callOut(id, out)), EXCHANGE_MS, `POST ${what}`);
              assert.equal(res.status, 202, `${what}: ${res.text}`);
              answer = await within(waitFor(() => legacy.stream.events.slice(from).map((e) => e.event === 'message' ? JSON.parse(e.data) : null)
                .find((m) => m && m.id === id && m.method === undefined), EXCHANGE_MS, `answer to ${what}`), EXCHANGE_MS + 1_000, `answer to ${what}`);
            } else {
              const url = `${h.url}/${transport === 'solo' ? 'mutsolo' : 'mut'}/mcp`;
              const accept = transport === 'mcp-sse' ? 'application/json, text/event-stream' : 'application/json';
              const res = await within(post(url, callOut(id, out), sessionHeaders(transport === 'solo' ? soloSid : sid, { accept })), EXCHANGE_MS, `answer to ${what}`);
              assertAllowed(res.status, res.headers, `${what} → ${res.status} ${res.text.slice(0, 300)}`);
              assert.equal(res.status, 200, `${what}: ${res.text.slice(0, 300)}`);
              const answers = answerMessages(res, what).filter((m) => m.method === undefined);
              assert.equal(answers.length, 1, `${what}: one answer, got ${res.text.slice(0, 500)}`);
              answer = answers[0];
            }
            assert.equal(answer.id, id, `${what}: the answer carries the client's id: ${JSON.stringify(answer).slice(0, 300)}`);
            assert.equal(answer.jsonrpc, '2.0');
            // The envelope the proxy checks (jsonRpcKind: exactly one of result and error). What is inside a child's
            // answer is the child's: an "error": null passes as it is (see the defect test below).
            assert.ok(('result' in answer) !== ('error' in answer), `${what}: a result or an error: ${JSON.stringify(answer).slice(0, 300)}`);
            const key = 'result' in answer ? 'result' : `error ${JSON.stringify(answer.error?.code ?? answer.error)}`;
            outcomes.set(key, (outcomes.get(key) ?? 0) + 1);
            // Another session on the same child is still served, with its own answer (the child serves calls in order).
            const by = await within(post(`${h.url}/mut/mcp`, callOut(`by-${n}`, okOut), sessionHeaders(bystander)), EXCHANGE_MS, `bystander after ${what}`);
            assert.equal(by.status, 200, `bystander after ${what}: ${by.text}`);
            const byAnswer = onlyMessage(by);
            assert.equal(byAnswer.id, `by-${n}`);
            assert.equal(textOf(byAnswer.result), 'bystander', `bystander after ${what}: ${by.text.slice(0, 300)}`);
            if (transport === 'legacy') {
              // Its call's writes are all out (the bystander was answered after them): still one answer for the id.
              const mine = streamMessages(legacy.stream).filter((m) => m.id === id && m.method === undefined);
              assert.equal(mine.length, 1, `${what}: one answer on the legacy stream, got ${JSON.stringify(mine).slice(0, 300)}`);
            }
            await assertHealthy(h, what);
          })),
          params,
        ));
        for (const s of [legacy.stream, get, soloGet]) {
          for (const e of s.events.filter((ev) => ev.event === 'message')) assert.doesNotThrow(() => JSON.parse(e.data), `stream event ${e.data.slice(0, 200)}`);
        }
      } finally {
        legacy.stream.close();
        get.close();
        soloGet.close();
      }
      return runs;
    };
    const settle = async () => {
      for (const name of ['mut', 'mutsolo']) await deleteSessions(`${h.url}/${name}/mcp`, seenSids);
      seenSids.clear();
      await sessionsGone(h, 'mutated child output');
      await pidFileDead(pidFile, 'mutated child output');
    };
    await warmThenMain(t, round, settle, { warm: 20, main: 1_000, warmMs: 3_000, mainMs: 10_000 });
    t.diagnostic(`outcomes: ${[...outcomes].sort().map(([k, v]) => `${k} ×${v}`).join(', ')}; restarts ${h.proxy.status().mut!.restarts}`);
    assert.equal(h.proxy.status().mut!.pid, mutPid, 'no child output got the shared child restarted');
    flog.assertNoInternalError();
  });

  // ── Defects the fuzz found (each red until proxy.ts is fixed) ──

  it('fuzz finding: a per-session server\'s session is not expired as idle while its own initialize waits for the child to start (sessionIdleMs shorter than the start-up)', { timeout: 30_000 }, async (t) => {
    // Found by the JSON-RPC fuzz with sessionIdleMs 1.5 s and server-everything per session (start-up 1-2 s here):
    // the sweep ended the session and stopped the child it was starting; the client got 503 "MCP server is
    // stopped". With the defaults (30 min idle, 120 s initTimeoutMs) it could not happen; with an operator's
    // shorter idleTimeoutMs and a slow `npx -y` server it could. Fixed in isIdle.
    const h = await harness(t, { servers: [fixture('slow', 'slowinit', { sessions: 'per-session', env: { FIXTURE_INIT_DELAY_MS: '1500' } })] },
      { limits: { ...FAST, sessionIdleMs: 500, sweepIntervalMs: 50 } });
    const res = await within(post(`${h.url}/slow/mcp`, initMsg(0), { accept: 'application/json' }), 10_000, 'initialize');
    assert.equal(res.status, 200, `initialize of a per-session server whose child starts in 1.5 s, sessionIdleMs 500: ${res.status} ${res.text}`);
  });

  it('fuzz finding: a child answer whose "error" is not a JSON-RPC error object (null, a string code, no message) reaches the client as -32603, an answer it can read', { timeout: 30_000 }, async (t) => {
    // Found by the child-output fuzz: jsonRpcKind() checked that exactly one of result and error is present, not
    // what error holds. A client's SDK then failed to parse the message and its request waited for its own
    // timeout (the official SDK: 60 s) instead of getting an error. Fixed in routeChildResponse.
    const h = await harness(t, { servers: [srv('mut', ['-e', MUTANT])] }, { limits: FAST });
    await h.proxy.ready(10_000);
    const sid = await rawSession(h.url, 'mut');
    const bad = ['{"jsonrpc":"2.0","id":@ID@,"error":null}', '{"jsonrpc":"2.0","id":@ID@,"error":{"code":"x"}}', '{"jsonrpc":"2.0","id":@ID@,"error":{"code":1.5,"message":7}}'];
    const got: string[] = [];
    for (const [i, line] of bad.entries()) {
      const out = { writes: [Buffer.from(line + '\n').toString('base64')], gapMs: 0 };
      const res = await within(post(`${h.url}/mut/mcp`, { jsonrpc: '2.0', id: i, method: 'tools/call', params: { name: 'out', arguments: out } }, sessionHeaders(sid)), 5_000, 'answer');
      const answer = onlyMessage(res);
      if (!(Number.isInteger(answer.error?.code) && typeof answer.error.message === 'string')) got.push(`child wrote ${line}; client got ${res.text}`);
    }
    assert.deepEqual(got, [], 'answers whose error is not a JSON-RPC error object');
  });
});
