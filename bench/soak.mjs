#!/usr/bin/env node
// bench/soak.mjs — the soak test (`npm run soak`).
//
// Runs mixed load against dist/proxy.js for a set time, with faults injected on
// a schedule, samples the proxy from outside and tells whether its resources
// plateaued. The proxy is started with two servers, both bench/echo-server.mjs:
//   echo   shared child (one process for every session)
//   solo   "sessions": "per-session" (a child per session; PER_SESSION=0 omits it)
// Load, all with raw node:http clients (bench/lib/clients.mjs), no SDK:
//   steady   STREAM_SESSIONS Streamable + SSE_SESSIONS legacy SSE sessions on echo, and
//            SOLO_SESSIONS on solo (alternately Streamable / SSE), each sending tools/call
//            echo back-to-back (THINK_MS apart); a session that is lost is reopened
//   churn    CHURN_WORKERS workers that open a session (alternating transport, and
//            alternating echo / solo), make 1-5 calls, close it (DELETE for Streamable),
//            pause CHURN_PAUSE_MS, and again
//   a worker pauses 100 ms after a failed call or 250 ms after a failed open (as a client
//   would back off; a restart would otherwise be a hot loop of errors)
// Faults:
//   crashes      every CRASH_EVERY_S the shared echo child is SIGKILLed (found among the
//                proxy's descendants in /proc by its argv); every second time also one
//                per-session child, when one is running
//   disconnects  DISCONNECT_PCT % of calls are cut mid-request: Streamable, the POST's
//                socket is destroyed 0-2 ms after the request is written (or at the first
//                response byte); SSE, the session's GET stream is destroyed 0-2 ms after
//                the POST (the session is gone, the worker opens a new one)
// Every answer must carry its own request's token (`s<session>:r<seq>|`, sessions
// numbered across the whole run). An answer carrying another request's token is
// MISROUTED, as is an answer for another id on a Streamable POST (a POST answers one
// request). An SSE answer for an id no longer in flight is LATE (the client gave up
// first) when it carries this session's own token or none (an error answer cannot be
// attributed): counted, not a failure. Other errors
// are expected around crashes and disconnects and are only counted, by kind.
//
// Every SAMPLE_S seconds it records: the proxy's RSS (the proxy process alone), its
// open descriptors (/proc/PID/fd), its child processes (descendants in /proc,
// zombies excluded), the sessions this soak holds open (opened and not yet closed
// or lost) and the proxy's own count of open sessions (the sum of its
// mcp_proxy_sessions samples on /metrics: a session leaked inside the proxy shows
// there and not in the soak's count), the TCP
// connections established to the proxy's port (/proc/net/tcp*, informational) and
// each server's state from /readyz (detailed JSON: no token, loopback).
// At the end: the samples (thinned to ~20 rows), a plateau verdict per series and
// the totals. PLATEAU: the median of the last quarter of the samples minus the median
// of the second quarter (the first quarter is warm-up) is at most max(5 MB, 5 %) for
// RSS, FD_SLACK for descriptors and COUNT_SLACK for children and sessions.
// Exit code 0 when every series plateaued, no answer was misrouted, some requests
// succeeded, the proxy stayed up, no server was seen errored and no child outlived the
// proxy; else 1 (2: bad knobs, 3: watchdog).
//
// Knobs (env):
//   SOAK_MINUTES=30     duration; SOAK_SECONDS=60 overrides it (short runs)
//   SAMPLE_S=5          sampling period
//   CRASH_EVERY_S=15    crash period (0: no crashes). At least 13: the proxy restarts a child
//                       1 s after it dies, counts one that ran under 10 s as unstable and gives
//                       a server up (errored) after 5 unstable restarts in a row, by design;
//                       faster crashes would test that instead (a server left errored fails the soak)
//   DISCONNECT_PCT=2    percent of calls cut mid-request (0: none)
//   STREAM_SESSIONS=6  SSE_SESSIONS=6  SOLO_SESSIONS=2   steady sessions
//   CHURN_WORKERS=2  CHURN_PAUSE_MS=200                   churn (per-session children: at
//                       most 8 per credential, so keep SOLO_SESSIONS + CHURN_WORKERS small)
//   PER_SESSION=1       0: no per-session server (SOLO_SESSIONS and churn use echo only)
//   THINK_MS=2          pause between two calls of one steady session (0: back-to-back)
//   PAYLOAD=1024        response size of a call, bytes;  DISCONNECT_SIZE=65536 for cut calls
//   TIMEOUT_MS=10000    per-request timeout
//   FD_SLACK=16  COUNT_SLACK=2   plateau tolerances (absolute) for fds / children, sessions
//   MAX_MINUTES         watchdog for the whole run (default: duration + 3)
//   PROXY_JS=path       the proxy build (default dist/proxy.js)
//   PROXY_NODE_ARGS     extra node flags for the proxy
//
// Requires dist/proxy.js (node build.mjs); builds nothing. Talks to 127.0.0.1 only.
// Every process it starts is a process-group leader registered in lib/proc.mjs and
// is stopped with its descendants at the end, on error, on SIGINT/SIGTERM and at exit.

import fs from "node:fs";
import os from "node:os";
import net from "node:net";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { performance } from "node:perf_hooks";
import { SseSession, StreamableSession, BenchError, makeAgent, kindOf } from "./lib/clients.mjs";
import { scratchDirWithCleanup, startProcess, stopProcess, killAllSync, treePids, rssKb, alive } from "./lib/proc.mjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, "..");
const PROXY = path.resolve(process.env.PROXY_JS || path.join(ROOT, "dist", "proxy.js"));
const ECHO = path.join(HERE, "echo-server.mjs");
const NODE = process.execPath;

// ---------------------------------------------------------------- settings
const env = process.env;
const num = (v, d) => (v === undefined || v === "" ? d : Number(v));
const DURATION_S = env.SOAK_SECONDS ? Number(env.SOAK_SECONDS) : num(env.SOAK_MINUTES, 30) * 60;
const SAMPLE_S = num(env.SAMPLE_S, 5);
const CRASH_EVERY_S = num(env.CRASH_EVERY_S, 15);
const DISCONNECT_PCT = num(env.DISCONNECT_PCT, 2);
const STREAM_SESSIONS = num(env.STREAM_SESSIONS, 6);
const SSE_SESSIONS = num(env.SSE_SESSIONS, 6);
const PER_SESSION = env.PER_SESSION !== "0";
const SOLO_SESSIONS = num(env.SOLO_SESSIONS, 2);
const CHURN_WORKERS = num(env.CHURN_WORKERS, 2);
const CHURN_PAUSE_MS = num(env.CHURN_PAUSE_MS, 200);
const THINK_MS = num(env.THINK_MS, 2);
const PAYLOAD = num(env.PAYLOAD, 1024);
const DISCONNECT_SIZE = num(env.DISCONNECT_SIZE, 65536);
const TIMEOUT_MS = num(env.TIMEOUT_MS, 10_000);
const FD_SLACK = num(env.FD_SLACK, 16);
const COUNT_SLACK = num(env.COUNT_SLACK, 2);
const MAX_MINUTES = num(env.MAX_MINUTES, DURATION_S / 60 + 3);
const PROXY_NODE_ARGS = env.PROXY_NODE_ARGS ? env.PROXY_NODE_ARGS.split(/\s+/).filter(Boolean) : [];

const int = (x, lo, hi) => Number.isInteger(x) && x >= lo && x <= hi;
const bad = [];
if (!(DURATION_S >= 10 && DURATION_S <= 7 * 24 * 3600)) bad.push("SOAK_SECONDS / SOAK_MINUTES: 10 s to 7 days");
if (!(SAMPLE_S >= 0.5 && SAMPLE_S <= 600)) bad.push("SAMPLE_S must be in [0.5, 600]");
if (!(CRASH_EVERY_S === 0 || (CRASH_EVERY_S >= 13 && CRASH_EVERY_S <= 86400))) bad.push("CRASH_EVERY_S must be 0 or in [13, 86400] (see the header)");
if (!(DISCONNECT_PCT >= 0 && DISCONNECT_PCT <= 100)) bad.push("DISCONNECT_PCT must be in [0, 100]");
for (const [k, v] of Object.entries({ STREAM_SESSIONS, SSE_SESSIONS, SOLO_SESSIONS, CHURN_WORKERS })) if (!int(v, 0, 500)) bad.push(`${k} must be an integer in 0..500`);
if (STREAM_SESSIONS + SSE_SESSIONS + SOLO_SESSIONS + CHURN_WORKERS === 0) bad.push("no load: every *_SESSIONS and CHURN_WORKERS is 0");
if (!int(CHURN_PAUSE_MS, 0, 60_000) || !int(THINK_MS, 0, 60_000)) bad.push("CHURN_PAUSE_MS and THINK_MS must be integers in 0..60000");
if (!int(PAYLOAD, 1, 4_000_000) || !int(DISCONNECT_SIZE, 1, 4_000_000)) bad.push("PAYLOAD and DISCONNECT_SIZE must be integers in 1..4000000");
if (!(TIMEOUT_MS >= 100 && TIMEOUT_MS <= 600_000)) bad.push("TIMEOUT_MS must be in [100, 600000]");
if (!(FD_SLACK >= 0) || !(COUNT_SLACK >= 0)) bad.push("FD_SLACK and COUNT_SLACK must be >= 0");
if (!(MAX_MINUTES > DURATION_S / 60)) bad.push("MAX_MINUTES must exceed the duration");
if (bad.length) {
  console.error(`soak: ${bad.join("; ")}`);
  process.exit(2);
}
if (!fs.existsSync(PROXY)) {
  console.error(`soak: ${path.relative(process.cwd(), PROXY) || PROXY} not found. Build it first:  node build.mjs`);
  process.exit(2);
}

// ---------------------------------------------------------------- cleanup
const { dir: TMP, removeDir: removeTmp } = scratchDirWithCleanup("soak", "rmp-soak-", MAX_MINUTES);
const CONFIG = path.join(TMP, "config.json");
// The role argument is ignored by the echo server; it lets the crash injector tell the children apart in /proc.
const ROLE_SHARED = "--soak-role=shared";
const ROLE_SOLO = "--soak-role=per-session";
const SERVERS = { echo: { command: NODE, args: [ECHO, ROLE_SHARED] } };
if (PER_SESSION) SERVERS.solo = { command: NODE, args: [ECHO, ROLE_SOLO], sessions: "per-session" };
fs.writeFileSync(CONFIG, JSON.stringify({ mcpServers: SERVERS }));

// ---------------------------------------------------------------- helpers
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (...a) => console.error(...a);
const now = () => performance.now();

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** GET /readyz: {status, body} (body parsed when JSON), or {status: 0} on failure. */
function readyz(port) {
  return getText(port, "/readyz").then(({ status, text }) => {
    let json = null;
    try {
      json = JSON.parse(text);
    } catch {}
    return { status, body: json };
  });
}

/** The proxy's own count of open sessions: the sum of its mcp_proxy_sessions samples (GET /metrics), or null. */
async function proxySessions(port) {
  const { status, text } = await getText(port, "/metrics");
  if (status !== 200) return null;
  let sum = 0;
  for (const line of text.split("\n")) if (line.startsWith("mcp_proxy_sessions{")) sum += Number(line.slice(line.lastIndexOf(" ") + 1));
  return sum;
}

/** GET a path on the proxy: {status, text}, or {status: 0, text: ""} on failure. */
function getText(port, path) {
  return new Promise((resolve) => {
    const req = http.get({ host: "127.0.0.1", port, path, agent: false, timeout: 2000 }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d) => (body += d));
      res.on("end", () => resolve({ status: res.statusCode, text: body }));
      res.on("error", () => resolve({ status: 0, text: "" }));
    });
    req.on("timeout", () => req.destroy());
    req.on("error", () => resolve({ status: 0, text: "" }));
  });
}

function procState(pid) {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    return s.slice(s.lastIndexOf(")") + 2).split(" ")[0];
  } catch {
    return null;
  }
}

function cmdline(pid) {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
  } catch {
    return [];
  }
}

/** The proxy's live descendants (zombies excluded), with their argv. */
function children(proxyPid) {
  return treePids(proxyPid)
    .filter((p) => p !== proxyPid)
    .filter((p) => {
      const st = procState(p);
      return st !== null && st !== "Z";
    })
    .map((pid) => ({ pid, argv: cmdline(pid) }));
}

function fdCount(pid) {
  try {
    return fs.readdirSync(`/proc/${pid}/fd`).length;
  } catch {
    return null;
  }
}

/** TCP connections in state ESTABLISHED whose local port is `port` (the proxy's side). */
function establishedOn(port) {
  const hex = port.toString(16).toUpperCase().padStart(4, "0");
  let n = 0;
  for (const f of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text;
    try {
      text = fs.readFileSync(f, "utf8");
    } catch {
      continue;
    }
    for (const line of text.split("\n").slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols.length > 3 && cols[1].endsWith(`:${hex}`) && cols[3] === "01") n++;
    }
  }
  return n;
}

/** After a failed call a worker pauses (a real client would back off; without it a restart is a hot loop of errors). */
const ERROR_PAUSE_MS = 100;

const median = (xs) => {
  const s = xs.filter((x) => x != null).sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)] : null;
};
const fmt = (x, d = 0) => (x == null || Number.isNaN(x) ? "–" : x.toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d }));

// ---------------------------------------------------------------- tallies
const T = {
  ok: 0,
  errors: {}, // kind -> count
  firstError: {}, // kind -> first message
  misrouted: 0,
  late: 0,
  crashesShared: 0,
  crashesSolo: 0,
  disconnectsStream: 0,
  disconnectsSse: 0,
  cutBeforeAnswer: 0,
  opened: 0,
  closed: 0,
  lost: 0,
  openFailed: 0,
  erroredSeen: new Set(),
};
function addError(kind, message) {
  T.errors[kind] = (T.errors[kind] ?? 0) + 1;
  if (!T.firstError[kind]) T.firstError[kind] = String(message ?? "").slice(0, 160);
}
const errorTotal = () => Object.values(T.errors).reduce((a, b) => a + b, 0);

// A token names the session (numbered across the run) and the request: s12:r34| (x: a call cut on purpose).
const TOKEN_RE = /^s(\d+):[rx]\d+\|/;

/** SSE session that tells an answer for an id no longer in flight apart: this session's own (late) or another's. */
class SoakSse extends SseSession {
  dispatch(msg) {
    if (msg && msg.method === undefined && !this.pending.has(msg.id)) {
      const m = TOKEN_RE.exec(msg.result?.content?.[0]?.text ?? "");
      if (m && Number(m[1]) !== this.label) {
        T.misrouted++;
        addError("misrouted", `SSE session s${this.label} got ${JSON.stringify(msg).slice(0, 120)}`);
      } else T.late++;
      return;
    }
    super.dispatch(msg);
  }
}

// ---------------------------------------------------------------- the soak
let PORT;
let proxy;
let stopping = false;
const agent = makeAgent();
const held = new Set(); // sessions opened and not yet closed or lost
let nextLabel = 0;

async function openSession(transport, server) {
  const url = `http://127.0.0.1:${PORT}/${server}/${transport === "sse" ? "sse" : "mcp"}`;
  const s = transport === "sse" ? new SoakSse({ url, agent, timeoutMs: TIMEOUT_MS }) : new StreamableSession({ url, agent, timeoutMs: TIMEOUT_MS });
  s.label = nextLabel++;
  s.transport = transport;
  s.seq = 0;
  try {
    await s.open();
  } catch (e) {
    T.openFailed++;
    addError(`open:${kindOf(e)}`, e.message);
    s.drop();
    return null;
  }
  T.opened++;
  held.add(s);
  return s;
}

/** Whether a session is unusable now (SSE stream gone, or the proxy no longer knows the Streamable session). */
function isLost(s, e) {
  if (s.closed) return true;
  return s.transport === "streamable" && e && kindOf(e) === "http" && / 404\b/.test(e.message);
}

function forget(s, how) {
  if (!held.delete(s)) return;
  if (how === "closed") T.closed++;
  else T.lost++;
}

/** One checked tools/call. */
async function checkedCall(s) {
  const token = `s${s.label}:r${s.seq++}|`;
  const stray0 = s.stats.stray;
  try {
    const r = await s.call({ method: "tools/call", params: { name: "echo", arguments: { text: token, size: PAYLOAD } } });
    const msg = r.msg;
    const text = msg.result?.content?.[0]?.text;
    if (msg.error) {
      addError("rpc", JSON.stringify(msg.error));
      await sleep(ERROR_PAUSE_MS);
    }
    else if (typeof text !== "string") addError("bad", JSON.stringify(msg).slice(0, 160));
    else if (!text.startsWith(token)) {
      if (TOKEN_RE.test(text)) {
        T.misrouted++;
        addError("misrouted", `session s${s.label} asked ${token} got ${text.slice(0, 40)}`);
      } else addError("bad", text.slice(0, 80));
    } else if (text.length !== Math.max(PAYLOAD, token.length)) addError("bad_size", `${text.length} bytes`);
    else T.ok++;
  } catch (e) {
    addError(kindOf(e), e.message);
    if (isLost(s, e)) {
      s.drop();
      forget(s, "lost");
    } else if (kindOf(e) === "connect") await sleep(50);
    else await sleep(ERROR_PAUSE_MS);
  }
  // A Streamable POST answers exactly one request: an answer for another id in its body is misrouted.
  if (s.transport === "streamable" && s.stats.stray > stray0) {
    T.misrouted += s.stats.stray - stray0;
    addError("misrouted", `Streamable session s${s.label}: answer for another id on the POST of ${token}`);
  }
}

/** A call whose connection is cut while it is in flight (see the header). */
async function disconnectCall(s) {
  const id = s.newId();
  const msg = { jsonrpc: "2.0", id, method: "tools/call", params: { name: "echo", arguments: { text: `s${s.label}:x${id}|`, size: DISCONNECT_SIZE } } };
  const delay = Math.random() * 2;
  if (s.transport === "sse") {
    T.disconnectsSse++;
    let answered = false;
    const p = s.request(msg).then(
      () => (answered = true),
      () => {},
    );
    await sleep(delay);
    if (!answered) T.cutBeforeAnswer++;
    s.lose(new BenchError("session_lost", "disconnect injected"));
    s.getReq?.destroy();
    forget(s, "closed"); // on purpose: not a loss
    await p;
    return;
  }
  T.disconnectsStream++;
  await new Promise((resolve) => {
    const body = JSON.stringify(msg);
    const req = http.request({
      host: "127.0.0.1",
      port: PORT,
      path: s.url.pathname,
      method: "POST",
      headers: s.headers({ "Content-Length": Buffer.byteLength(body) }),
      agent: false,
    });
    let cut = false;
    const cutNow = (beforeAnswer) => {
      if (cut) return;
      cut = true;
      if (beforeAnswer) T.cutBeforeAnswer++;
      req.destroy();
    };
    req.on("response", (res) => {
      res.on("error", () => {});
      res.once("data", () => cutNow(false));
      res.on("end", () => cutNow(false));
    });
    req.on("error", () => {});
    req.on("close", resolve);
    req.end(body, () => setTimeout(() => cutNow(true), delay));
  });
}

async function callOrCut(s) {
  if (DISCONNECT_PCT > 0 && Math.random() * 100 < DISCONNECT_PCT) return disconnectCall(s);
  return checkedCall(s);
}

async function steadyWorker(transport, server, endAt) {
  let s = null;
  for (let n = 0; n < 1e9 && now() < endAt && !stopping; n++) {
    if (!s || !held.has(s)) {
      s = await openSession(transport, server);
      if (!s) {
        await sleep(250);
        continue;
      }
    }
    await callOrCut(s);
    if (THINK_MS) await sleep(THINK_MS);
  }
  if (s && held.has(s)) {
    await s.close().catch(() => {});
    forget(s, "closed");
  }
}

async function churnWorker(w, endAt) {
  for (let n = 0; n < 1e9 && now() < endAt && !stopping; n++) {
    const transport = (n + w) % 2 ? "sse" : "streamable";
    const server = PER_SESSION && Math.floor(n / 2) % 2 ? "solo" : "echo";
    const s = await openSession(transport, server);
    if (s) {
      const calls = 1 + Math.floor(Math.random() * 5);
      for (let i = 0; i < calls && held.has(s) && !stopping; i++) await callOrCut(s);
      if (held.has(s)) {
        await s.close().catch(() => {});
        forget(s, "closed");
      }
    }
    await sleep(CHURN_PAUSE_MS);
  }
}

// ---------------------------------------------------------------- faults
let crashTick = 0;
function injectCrash() {
  if (!proxy || proxy.exitCode !== null) return;
  crashTick++;
  const kids = children(proxy.pid);
  const shared = kids.find((k) => k.argv.includes(ROLE_SHARED));
  if (shared) {
    try {
      process.kill(shared.pid, "SIGKILL");
      T.crashesShared++;
    } catch {}
  }
  if (crashTick % 2 === 0) {
    const solos = kids.filter((k) => k.argv.includes(ROLE_SOLO));
    if (solos.length) {
      const victim = solos[Math.floor(Math.random() * solos.length)];
      try {
        process.kill(victim.pid, "SIGKILL");
        T.crashesSolo++;
      } catch {}
    }
  }
}

// ---------------------------------------------------------------- sampling
const samples = [];
const seenChildren = new Map(); // pid -> argv, every child seen (checked for leftovers at the end)
let last = { ok: 0, err: 0, t: 0 };

async function sample(t0) {
  const t = (now() - t0) / 1000;
  const kids = children(proxy.pid);
  for (const k of kids) seenChildren.set(k.pid, k.argv.join(" "));
  const rz = await readyz(PORT);
  const servers = rz.body?.servers ?? {};
  for (const [name, v] of Object.entries(servers)) if (v?.state === "errored") T.erroredSeen.add(name);
  const err = errorTotal();
  const s = {
    t,
    rssMb: rssKb(proxy.pid) / 1024,
    fds: fdCount(proxy.pid),
    children: kids.length,
    sessions: held.size,
    proxySessions: await proxySessions(PORT),
    conns: establishedOn(PORT),
    okPerS: (T.ok - last.ok) / Math.max(0.001, t - last.t),
    errors: err - last.err,
    crashes: T.crashesShared + T.crashesSolo,
    disconnects: T.disconnectsStream + T.disconnectsSse,
    states: rz.status ? Object.entries(servers).map(([k, v]) => `${k}:${v?.state ?? "?"}`).join(" ") || `HTTP ${rz.status}` : "no answer",
  };
  last = { ok: T.ok, err, t };
  samples.push(s);
  return s;
}

// ---------------------------------------------------------------- verdicts
const SERIES = [
  { key: "rssMb", label: "RSS (MB)", tol: (base) => Math.max(5, 0.05 * base), tolText: "max(5 MB, 5 %)", d: 1 },
  { key: "fds", label: "open fds", tol: () => FD_SLACK, tolText: `${FD_SLACK}`, d: 0 },
  { key: "children", label: "children", tol: () => COUNT_SLACK, tolText: `${COUNT_SLACK}`, d: 0 },
  { key: "sessions", label: "sessions (held by the soak)", tol: () => COUNT_SLACK, tolText: `${COUNT_SLACK}`, d: 0 },
  // The proxy's count includes churned sessions between their last call and their DELETE.
  { key: "proxySessions", label: "sessions (the proxy's, /metrics)", tol: () => 2 * COUNT_SLACK + 4, tolText: `${2 * COUNT_SLACK + 4}`, d: 0 },
];

function plateau(series) {
  const n = samples.length;
  if (n < 4) return { ok: false, text: `too few samples (${n} < 4)` };
  const q2 = samples.slice(Math.floor(n / 4), Math.floor(n / 2)).map((s) => s[series.key]);
  const q4 = samples.slice(Math.floor((3 * n) / 4)).map((s) => s[series.key]);
  const a = median(q2);
  const b = median(q4);
  if (a == null || b == null) return { ok: false, text: "not measured" };
  const growth = b - a;
  const tol = series.tol(a);
  return { ok: growth <= tol, a, b, growth, tol };
}

function sampleTable() {
  const n = samples.length;
  const step = Math.max(1, Math.ceil(n / 20));
  const rows = samples.filter((_, i) => i % step === 0 || i === n - 1);
  const head = ["t (s)", "RSS MB", "fds", "children", "sessions", "proxy sessions", "conns", "ok/s", "errors", "crashes", "cuts", "servers (/readyz)"];
  const body = rows.map((s) => [fmt(s.t), fmt(s.rssMb, 1), fmt(s.fds), fmt(s.children), fmt(s.sessions), fmt(s.proxySessions), fmt(s.conns), fmt(s.okPerS), fmt(s.errors), fmt(s.crashes), fmt(s.disconnects), s.states]);
  const w = head.map((h, i) => Math.max(h.length, ...body.map((r) => String(r[i]).length)));
  const line = (r) => r.map((c, i) => (i === r.length - 1 ? String(c) : String(c).padStart(w[i]))).join("  ");
  return [line(head), ...body.map(line)].join("\n");
}

// ---------------------------------------------------------------- main
async function main() {
  PORT = await freePort();
  proxy = startProcess("proxy", NODE, [...PROXY_NODE_ARGS, PROXY, "--config", CONFIG, "--host", "127.0.0.1", "--port", String(PORT), "--log-level", "warn"]);
  const readyBy = now() + 30_000;
  for (;;) {
    if (proxy.exitCode !== null || proxy.signalCode !== null) throw new Error(`proxy exited before ready:\n${proxy.tail()}`);
    if ((await readyz(PORT)).status === 200) break;
    if (now() > readyBy) throw new Error(`proxy not ready within 30 s:\n${proxy.tail()}`);
    await sleep(20);
  }
  const mins = DURATION_S / 60;
  log(
    `soak: proxy pid ${proxy.pid} on 127.0.0.1:${PORT}; ${mins >= 1 ? `${fmt(mins, 1)} min` : `${DURATION_S} s`}; ` +
      `steady ${STREAM_SESSIONS} Streamable + ${SSE_SESSIONS} SSE on echo, ${PER_SESSION ? SOLO_SESSIONS : 0} on solo (per-session); ` +
      `churn ${CHURN_WORKERS}; crash every ${CRASH_EVERY_S || "–"} s; cut ${DISCONNECT_PCT} % of calls; sample every ${SAMPLE_S} s`,
  );

  const t0 = now();
  const endAt = t0 + DURATION_S * 1000;
  // Workers run until `stopping`, set after the last sample (so it sees the full load); this is only a bound.
  const workersEnd = endAt + 60_000;
  const workers = [];
  const soloServer = PER_SESSION ? "solo" : "echo";
  for (let i = 0; i < STREAM_SESSIONS; i++) workers.push(steadyWorker("streamable", "echo", workersEnd));
  for (let i = 0; i < SSE_SESSIONS; i++) workers.push(steadyWorker("sse", "echo", workersEnd));
  for (let i = 0; i < SOLO_SESSIONS; i++) workers.push(steadyWorker(i % 2 ? "sse" : "streamable", soloServer, workersEnd));
  for (let i = 0; i < CHURN_WORKERS; i++) workers.push(churnWorker(i, workersEnd));

  const crashTimer = CRASH_EVERY_S ? setInterval(injectCrash, CRASH_EVERY_S * 1000) : null;
  const progressEvery = Math.max(1, Math.round(30 / SAMPLE_S));
  let proxyDied = false;
  for (let i = 1; now() < endAt; i++) {
    await sleep(Math.max(0, Math.min(t0 + i * SAMPLE_S * 1000, endAt) - now()));
    if (proxy.exitCode !== null || proxy.signalCode !== null) {
      proxyDied = true;
      log(`soak: the proxy exited (${proxy.exitCode ?? proxy.signalCode}):\n${proxy.tail()}`);
      break;
    }
    const s = await sample(t0);
    if (i % progressEvery === 0) {
      log(`  t=${fmt(s.t)} s  RSS ${fmt(s.rssMb, 1)} MB  fds ${s.fds}  children ${s.children}  sessions ${s.sessions}  ok ${fmt(T.ok)}  errors ${fmt(errorTotal())}  misrouted ${T.misrouted}  ${s.states}`);
    }
  }
  if (crashTimer) clearInterval(crashTimer);
  stopping = true;
  // Workers stop at their next turn; a request in flight ends within TIMEOUT_MS.
  await Promise.race([Promise.all(workers), sleep(TIMEOUT_MS + 5000)]);
  for (const s of held) {
    await Promise.race([s.close().catch(() => {}), sleep(2000)]);
    forget(s, "closed");
  }
  agent.destroy(); // pooled keep-alive sockets too, so "after" shows what the proxy itself still holds
  await sleep(1000);
  let after = null;
  if (!proxyDied) {
    const kids = children(proxy.pid);
    after = { rssMb: rssKb(proxy.pid) / 1024, fds: fdCount(proxy.pid), children: kids.length, conns: establishedOn(PORT) };
  }
  const proxyTail = proxy.tail();
  await stopProcess(proxy);

  // Leftovers: any child seen during the run that still runs (pid reuse is checked through its argv).
  await sleep(200);
  const leftovers = [...seenChildren].filter(([pid, argv]) => alive(pid) && procState(pid) !== "Z" && cmdline(pid).join(" ") === argv);
  for (const [pid] of leftovers) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {}
  }

  // ---------------------------------------------------------------- report
  const out = [];
  out.push(`\n## Soak: ${fmt(DURATION_S / 60, 1)} min, ${samples.length} samples every ${SAMPLE_S} s (showing ${Math.min(samples.length, 21)} or fewer)\n`);
  out.push(sampleTable());
  out.push(
    "\nsessions = sessions this soak holds open (opened, not yet closed or lost); proxy sessions = the proxy's own count (/metrics)." +
      "\nconns = TCP connections established to the proxy's port; cuts = disconnects injected so far; errors and ok/s are per sample interval.",
  );
  if (after) out.push(`after the load (sessions closed, +1 s): RSS ${fmt(after.rssMb, 1)} MB, fds ${after.fds}, children ${after.children}, conns ${after.conns}`);
  out.push(`\nPlateau = median of the last quarter of the samples minus the median of the second quarter (the first is warm-up) within the tolerance.`);
  let pass = !proxyDied;
  for (const series of SERIES) {
    const p = plateau(series);
    pass &&= p.ok;
    const detail = p.text ?? `Q2 median ${fmt(p.a, series.d)} -> Q4 median ${fmt(p.b, series.d)}, growth ${p.growth >= 0 ? "+" : ""}${fmt(p.growth, series.d)} (tolerance ${series.tolText}${series.key === "rssMb" ? ` = ${fmt(p.tol, 1)} MB` : ""})`;
    out.push(`  ${series.label.padEnd(28)} ${p.ok ? "plateaued " : "GREW      "} ${detail}`);
  }
  out.push(`\nTotals`);
  out.push(`  requests ok                ${fmt(T.ok)}`);
  out.push(`  misrouted                  ${fmt(T.misrouted)}${T.misrouted ? "   <- FAILURE: an answer reached the wrong request" : " (must be 0)"}`);
  out.push(`  late answers (SSE)         ${fmt(T.late)}   (came after this client gave up on the request; own token or none: not a failure)`);
  out.push(`  errors                     ${fmt(errorTotal() - (T.errors.misrouted ?? 0))} (expected around crashes and cuts)`);
  for (const [k, v] of Object.entries(T.errors).sort((a, b) => b[1] - a[1])) {
    if (k === "misrouted") continue;
    out.push(`    ${k.padEnd(22)} ${fmt(v).padStart(8)}   first: ${T.firstError[k]}`);
  }
  if (T.misrouted) out.push(`  first misrouted: ${T.firstError.misrouted}`);
  out.push(`  crashes injected           ${T.crashesShared} shared child, ${T.crashesSolo} per-session child (SIGKILL)`);
  out.push(`  disconnects injected       ${T.disconnectsStream} Streamable POST, ${T.disconnectsSse} SSE stream; ${T.cutBeforeAnswer} of them before any answer byte arrived`);
  out.push(`  sessions                   ${T.opened} opened, ${T.closed} closed (cut ones included), ${T.lost} lost, ${T.openFailed} failed to open`);
  out.push(`  children seen              ${seenChildren.size} distinct pids; left running after the proxy stopped: ${leftovers.length}${leftovers.length ? " (killed now)" : ""}`);
  if (T.erroredSeen.size) out.push(`  servers seen errored       ${[...T.erroredSeen].join(", ")}   <- FAILURE: the crash schedule left a server given up`);
  if (proxyDied) out.push(`  the proxy exited during the soak   <- FAILURE`);
  if (T.ok === 0) out.push(`  no request succeeded   <- FAILURE`);
  pass &&= T.misrouted === 0 && T.ok > 0 && T.erroredSeen.size === 0 && leftovers.length === 0;
  if (leftovers.length) out.push(`  children outlived the proxy   <- FAILURE`);
  out.push(`\nsoak: ${pass ? "PASS" : "FAIL"}`);
  console.log(out.join("\n"));
  if (!pass && proxyTail.trim()) log(`\nlast proxy output:\n${proxyTail.slice(-1500)}`);
  return pass ? 0 : 1;
}

main().then(
  (code) => {
    killAllSync();
    removeTmp();
    process.exit(code);
  },
  (e) => {
    console.error(`soak: ${e?.stack ?? e}`);
    killAllSync();
    removeTmp();
    process.exit(1);
  },
);
