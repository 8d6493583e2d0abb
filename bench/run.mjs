#!/usr/bin/env node
// bench/run.mjs — the benchmark of issue 3 (`npm run bench`).
//
// Measures our proxy (dist/proxy.js, one shared stdio echo child) on both of
// its transports against two floors measured in the same run:
//   direct stdio   the echo child driven over its pipe by this process (no HTTP)
//   HTTP floor     bench/http-floor.mjs, a bare node:http server answering
//                  initialize and tools/call echo in-process (no child), on the
//                  same paths and both transports
// and prints one markdown table (our figures also as ratios to the floors) plus
// a short table of the ratios the issue sets targets for.
//
// All clients are raw node:http (bench/lib/clients.mjs), no SDK. Every response
// is checked: it must carry the token of the request it answers (which names
// the session and the request) and have the exact expected size; anything else
// is counted as an error, never as throughput. Sessions use per-session JSON-RPC
// ids that all start at 0 (like SDK clients), the worst case for id routing.
//
// Usage (env knobs; flags in brackets):
//   npm run bench                              full run (~3-4 min on 2 cores)
//   QUICK=1 npm run bench        [--quick]     smoke run, under ~60 s
//   SESSIONS=20000 npm run bench [--sessions N] idle-session phase with N sessions
//   LEAK=1 npm run bench         [--leak]      leak check instead: ROUNDS load rounds on one
//                                              proxy per transport x payload, RSS after each
//   DUR=5         seconds measured per load cell (QUICK: 1)
//   WARMUP=1      unmeasured seconds before each cell (QUICK: 0.3)
//   CONCS="1 32"  concurrencies (sessions, one request in flight each)
//   PAYLOADS="100 102400"  response sizes in bytes
//   SESSIONS=2000 idle sessions for the "N idle sessions" row (max 20000; QUICK: 200)
//   IDLE_GET=1    Streamable idle sessions also hold the standalone GET stream
//                 (default: initialize only, like Claude.ai, which holds no stream)
//   COLD_TRIALS=3 cold-start trials (median printed; QUICK: 1)
//   ROUNDS=10     leak-check rounds;  LEAK_C = concurrency in leak rounds (default max CONCS)
//   ONLY=direct,http-sse,http-stream,relay-sse,relay-stream,ours-sse,ours-stream,ours-modern   run a subset
//   PHASES=cold,load,idle   run a subset of phases (cold start, load matrix, idle sessions);
//                 `reload` (not in the default set): for each of our targets, one load cell (the
//                 largest CONCS, the smallest PAYLOADS) quiet, then the same cell while the config
//                 file is rewritten in a loop (a second server added, then removed), each reload
//                 applied (checked on /readyz) before the next write; prints p50/p99 of both
//   RELOAD_PAUSE_MS=100 quiet time after each applied reload before the next write
//   TIMEOUT_MS=10000 per-request timeout;  MAX_MINUTES=40 watchdog for the whole run
//   OUT=file.json also write the raw results as JSON
//   PROXY_JS=path  the proxy build to measure (default dist/proxy.js), for A/B runs of two builds
//   BENCH_TOKEN=t  start our proxy with --token t and send it on every request (the cost of auth; >= 16 chars)
//   PROXY_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof"   extra node flags for the proxy
//                 (a profile is written when the proxy exits on the SIGTERM the bench sends)
//
// Requires dist/proxy.js (build it with `node build.mjs`); builds nothing.
// Talks to 127.0.0.1 only. Every process it starts is a process-group leader
// registered in lib/proc.mjs and is stopped (with its descendants) at the end
// of its phase, on error, on SIGINT/SIGTERM and at exit.

import fs from "node:fs";
import os from "node:os";
import net from "node:net";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { performance } from "node:perf_hooks";
import { makeSession, makeAgent, StdioPeer, kindOf } from "./lib/clients.mjs";
import { scratchDirWithCleanup, startProcess, stopProcess, stopAll, killAllSync, snapshotPids, treePids, rssKb, memAvailableMb, fdLimit } from "./lib/proc.mjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, "..");
const PROXY = path.resolve(process.env.PROXY_JS || path.join(ROOT, "dist", "proxy.js"));
const ECHO = path.join(HERE, "echo-server.mjs");
const HTTP_FLOOR = path.join(HERE, "http-floor.mjs");
const NODE = process.execPath;

// ---------------------------------------------------------------- settings
const argv = process.argv.slice(2);
const flag = (name) => argv.includes(`--${name}`);
const flagValue = (name) => {
  const i = argv.indexOf(`--${name}`);
  return i !== -1 ? argv[i + 1] : undefined;
};
const env = process.env;
const QUICK = flag("quick") || env.QUICK === "1";
const LEAK = flag("leak") || env.LEAK === "1";
const num = (v, d) => (v === undefined || v === "" ? d : Number(v));
const list = (v, d) => (v ? String(v).split(/[\s,]+/).filter(Boolean).map(Number) : d);

const DUR = num(env.DUR, QUICK ? (LEAK ? 0.5 : 1) : 5);
const WARMUP = num(env.WARMUP, QUICK ? 0.3 : 1);
const CONCS = list(env.CONCS, [1, 32]);
const PAYLOADS = list(env.PAYLOADS, [100, 102400]);
const SESSIONS = num(flagValue("sessions") ?? env.SESSIONS, QUICK ? 200 : 2000);
const IDLE_GET = env.IDLE_GET === "1";
const COLD_TRIALS = num(env.COLD_TRIALS, QUICK ? 1 : 3);
const ROUNDS = num(env.ROUNDS, 10);
const LEAK_C = num(env.LEAK_C, Math.max(...CONCS));
const TIMEOUT_MS = num(env.TIMEOUT_MS, 10_000);
const MAX_MINUTES = num(env.MAX_MINUTES, 40);
const ONLY = env.ONLY ? env.ONLY.split(",").map((s) => s.trim()) : null;
const PROXY_NODE_ARGS = env.PROXY_NODE_ARGS ? env.PROXY_NODE_ARGS.split(/\s+/).filter(Boolean) : [];
const PHASES = (env.PHASES ?? "cold,load,idle").split(",").map((s) => s.trim());
const RELOAD_PAUSE_MS = num(env.RELOAD_PAUSE_MS, 100);

const bad = [];
if (!(DUR > 0 && DUR <= 600)) bad.push("DUR must be in (0, 600]");
if (!(WARMUP >= 0 && WARMUP <= 60)) bad.push("WARMUP must be in [0, 60]");
if (!CONCS.length || CONCS.some((c) => !(Number.isInteger(c) && c >= 1 && c <= 1000))) bad.push("CONCS must be integers in 1..1000");
if (!PAYLOADS.length || PAYLOADS.some((p) => !(Number.isInteger(p) && p >= 1 && p <= 4_000_000))) bad.push("PAYLOADS must be integers in 1..4000000");
if (!(Number.isInteger(SESSIONS) && SESSIONS >= 32 && SESSIONS <= 20_000)) bad.push("SESSIONS must be an integer in 32..20000");
if (!(Number.isInteger(COLD_TRIALS) && COLD_TRIALS >= 1 && COLD_TRIALS <= 50)) bad.push("COLD_TRIALS must be in 1..50");
if (!(Number.isInteger(ROUNDS) && ROUNDS >= 2 && ROUNDS <= 100)) bad.push("ROUNDS must be in 2..100");
if (!(Number.isInteger(LEAK_C) && LEAK_C >= 1 && LEAK_C <= 1000)) bad.push("LEAK_C must be in 1..1000");
if (PHASES.some((p) => !["cold", "load", "idle", "reload"].includes(p))) bad.push("PHASES is a list of cold, load, idle, reload");
if (!(RELOAD_PAUSE_MS >= 0 && RELOAD_PAUSE_MS <= 60_000)) bad.push("RELOAD_PAUSE_MS must be in [0, 60000]");
if (bad.length) {
  console.error(`bench: ${bad.join("; ")}`);
  process.exit(2);
}
if (!fs.existsSync(PROXY)) {
  console.error(`bench: ${path.relative(process.cwd(), PROXY) || PROXY} not found. Build it first:  node build.mjs`);
  process.exit(2);
}

// The targets. `kind` picks the server process, `transport` the client.
const TARGETS = [
  { key: "direct", label: "direct stdio", kind: "direct", transport: "direct" },
  { key: "http-sse", label: "HTTP floor SSE", kind: "http", transport: "sse", path: "/echo/sse" },
  { key: "http-stream", label: "HTTP floor Streamable", kind: "http", transport: "streamable", path: "/echo/mcp" },
  { key: "relay-sse", label: "two-hop relay SSE", kind: "relay", transport: "sse", path: "/echo/sse" },
  { key: "relay-stream", label: "two-hop relay Streamable", kind: "relay", transport: "streamable", path: "/echo/mcp" },
  { key: "ours-sse", label: "ours SSE", kind: "ours", transport: "sse", path: "/echo/sse" },
  { key: "ours-stream", label: "ours Streamable", kind: "ours", transport: "streamable", path: "/echo/mcp" },
  { key: "ours-modern", label: "ours 2026-07-28 (sessionless)", kind: "ours", transport: "modern", path: "/echo/mcp" },
].filter((t) => !ONLY || ONLY.includes(t.key));
if (!TARGETS.length) {
  console.error("bench: ONLY selects no target (names: direct, http-sse, http-stream, relay-sse, relay-stream, ours-sse, ours-stream, ours-modern)");
  process.exit(2);
}

// ---------------------------------------------------------------- cleanup
const { dir: TMP, removeDir: removeTmp } = scratchDirWithCleanup("bench", "rmp-bench-", MAX_MINUTES);
const CONFIG = path.join(TMP, "config.json");
const BASE_SERVERS = { echo: { command: NODE, args: [ECHO] } };
fs.writeFileSync(CONFIG, JSON.stringify({ mcpServers: BASE_SERVERS }));

// ---------------------------------------------------------------- helpers
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (...a) => console.error(...a);

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

function httpStatus(port, p, timeoutMs = 1000) {
  return new Promise((resolve) => {
    const req = http.get({ host: "127.0.0.1", port, path: p, agent: false, timeout: timeoutMs }, (res) => {
      res.resume();
      resolve(res.statusCode);
    });
    req.on("timeout", () => req.destroy());
    req.on("error", () => resolve(0));
  });
}

/** Poll GET /readyz until 200 (bounded: 30 s). */
async function waitReady(cp, port) {
  const deadline = performance.now() + 30_000;
  for (let i = 0; i < 3000 && performance.now() < deadline; i++) {
    if (cp.exitCode !== null || cp.signalCode !== null) throw new Error(`process exited before ready:\n${cp.tail()}`);
    if ((await httpStatus(port, "/readyz")) === 200) return;
    await sleep(10);
  }
  throw new Error(`not ready within 30 s:\n${cp.tail()}`);
}

function spawnServerProcess(kind, port) {
  if (kind === "ours") return startProcess("proxy", NODE, [...PROXY_NODE_ARGS, PROXY, "--config", CONFIG, "--host", "127.0.0.1", "--port", String(port), "--log-level", "warn", ...(process.env.BENCH_TOKEN ? ["--token", process.env.BENCH_TOKEN] : [])]);
  if (kind === "http") return startProcess("http-floor", NODE, [HTTP_FLOOR, "--port", String(port)]);
  if (kind === "relay") return startProcess("relay", NODE, [HTTP_FLOOR, "--port", String(port), "--relay", ECHO]);
  throw new Error(kind);
}

function spawnEcho() {
  return startProcess("echo-server", NODE, [ECHO], { stdin: "pipe", rawStdout: true });
}

/**
 * Start one server of a kind. Returns {kind, pid, base, peer?, pids(), ownPid, stop()}:
 * `pids()` is the fixed list whose CPU/RSS is "the proxy tree" (proxy + its
 * child; the floor server; the echo child), `ownPid` the process alone.
 */
async function startServer(kind) {
  if (kind === "direct") {
    const peer = new StdioPeer(null, spawnEcho);
    await peer.request({ jsonrpc: "2.0", id: "warm", method: "ping" }, 10_000); // started and answering
    const pid = peer.pid;
    return {
      kind,
      peer,
      pid,
      ownPid: pid,
      pids: () => [pid],
      stop: async () => {
        await Promise.race([peer.close(), sleep(4000)]);
        await stopProcess(peer.child);
      },
    };
  }
  const port = await freePort();
  const cp = spawnServerProcess(kind, port);
  try {
    await waitReady(cp, port);
  } catch (e) {
    await stopProcess(cp);
    throw e;
  }
  cp.rememberTree();
  const tree = treePids(cp.pid); // proxy + echo child (the tree does not change during a phase)
  return {
    kind,
    pid: cp.pid,
    ownPid: cp.pid,
    base: `http://127.0.0.1:${port}`,
    pids: () => tree,
    alive: () => cp.exitCode === null && cp.signalCode === null,
    tail: () => cp.tail(),
    stop: () => stopProcess(cp),
  };
}

function newSession(t, srv, i, agent, extra = {}) {
  return makeSession(t.transport, {
    index: i,
    url: t.path ? srv.base + t.path : undefined,
    agent,
    // one pipe is shared by all direct sessions, so their ids must differ there;
    // over HTTP every session uses ids 0,1,2,... (the proxy must keep them apart)
    idBase: t.transport === "direct" ? i * 1_000_000 : 0,
    timeoutMs: TIMEOUT_MS,
    peer: srv.peer,
    ...extra,
  });
}

/** Open sessions with at most `conc` handshakes in flight; returns the opened ones. */
async function openSessions(sessions, conc, errs, deadlineMs = 120_000, guard) {
  const deadline = performance.now() + deadlineMs;
  let next = 0;
  const opened = [];
  let stop = null;
  async function worker() {
    while (next < sessions.length && !stop) {
      if (performance.now() > deadline) {
        stop = `opening exceeded ${deadlineMs / 1000} s`;
        break;
      }
      const i = next++;
      if (guard && i % 500 === 0) {
        const g = guard();
        if (g) {
          stop = g;
          break;
        }
      }
      try {
        await sessions[i].open();
        opened.push(sessions[i]);
      } catch (e) {
        errs.add(e);
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(conc, sessions.length) }, worker));
  return { opened, stop };
}

/** Error tally for one target: kinds, wrong-session responses, first message of each. */
class Errors {
  constructor() {
    this.kinds = {};
    this.first = {};
  }
  add(e, kind = kindOf(e)) {
    this.kinds[kind] = (this.kinds[kind] ?? 0) + 1;
    if (!this.first[kind]) this.first[kind] = String(e?.message ?? e).slice(0, 200);
  }
  addN(kind, n, message) {
    if (n <= 0) return;
    this.add(message, kind);
    this.kinds[kind] += n - 1;
  }
  get total() {
    return Object.values(this.kinds).reduce((a, b) => a + b, 0);
  }
  /** Responses that reached the wrong session: another request's token, or an id not in flight there. */
  get misrouted() {
    return (this.kinds.misrouted ?? 0) + (this.kinds.stray ?? 0);
  }
}

const TOKEN_RE = /^s\d+:r\d+\|/;
/** Check one tools/call answer: ok | misrouted | rpc | bad. */
function check(msg, token, payload) {
  if (msg.error) return "rpc";
  const text = msg.result?.content?.[0]?.text;
  if (typeof text !== "string") return "bad";
  if (!text.startsWith(token)) return TOKEN_RE.test(text) ? "misrouted" : "bad";
  return text.length === Math.max(payload, token.length) ? "ok" : "bad_size";
}

/** One tools/call on a session, checked. Returns latency (µs) if correct, else null (error recorded). */
async function checkedCall(s, i, seq, payload, errs) {
  const token = `s${i}:r${seq}|`;
  try {
    const r = await s.call({ method: "tools/call", params: { name: "echo", arguments: { text: token, size: payload } } });
    const c = check(r.msg, token, payload);
    if (c === "ok") return r.latencyUs;
    errs.add(c === "rpc" ? JSON.stringify(r.msg.error) : JSON.stringify(r.msg).slice(0, 200), c);
  } catch (e) {
    errs.add(e);
    if (kindOf(e) === "connect") await sleep(50); // don't spin on a dead port
  }
  return null;
}

/** Responses seen for ids with no request in flight (the pipe's count for direct, else the sessions'). */
function strayCount(t, srv, sessions) {
  if (t.transport === "direct") return srv.peer.stats.stray;
  return sessions.reduce((a, s) => a + s.stats.stray, 0);
}

const pct = (sorted, p) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] : null);
const median = (xs) => {
  const s = xs.filter((x) => x != null).sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)] : null;
};

// ---------------------------------------------------------------- load cell
const MAX_CALLS_PER_SESSION = 50_000_000; // count bound on every driver loop (time bounds it first)

/**
 * C sessions, each sending tools/call echo back-to-back (one in flight) for
 * WARMUP + DUR seconds. Only correct answers in the measured window count for
 * req/s and latency; errors are counted over the whole cell.
 */
async function loadCell(t, srv, C, payload, durS, warmS, errs) {
  const agent = makeAgent();
  const sessions = Array.from({ length: C }, (_, i) => newSession(t, srv, i, agent));
  const { opened } = await openSessions(sessions, 16, errs);
  const stray0 = strayCount(t, srv, opened);
  const pids = srv.pids();
  const lat = [];
  let ok = 0;
  let measuring = false;
  async function drive(s, endAt) {
    for (let n = 0; n < MAX_CALLS_PER_SESSION && performance.now() < endAt && !s.closed; n++) {
      const us = await checkedCall(s, s.index, s.seq++, payload, errs);
      if (us !== null && measuring) {
        ok++;
        lat.push(us);
      }
    }
  }
  for (const s of opened) s.seq = 0;
  if (warmS > 0) {
    const endW = performance.now() + warmS * 1000;
    await Promise.all(opened.map((s) => drive(s, endW)));
  }
  let peakRss = 0;
  const sampler = setInterval(() => {
    peakRss = Math.max(peakRss, snapshotPids(pids).rssKb);
  }, 500);
  const cpu0 = snapshotPids(pids).cpuS;
  measuring = true;
  const t0 = performance.now();
  await Promise.all(opened.map((s) => drive(s, t0 + durS * 1000)));
  const elapsedS = (performance.now() - t0) / 1000;
  measuring = false;
  const snap1 = snapshotPids(pids);
  clearInterval(sampler);
  errs.addN("stray", strayCount(t, srv, opened) - stray0, "response for an id not in flight on this session");
  await Promise.all(opened.map((s) => s.close().catch(() => {})));
  agent.destroy();
  lat.sort((a, b) => a - b);
  return {
    C,
    payload,
    sessions: opened.length,
    ok,
    rps: ok / elapsedS,
    p50: pct(lat, 50),
    p90: pct(lat, 90),
    p99: pct(lat, 99),
    max: lat.length ? lat[lat.length - 1] : null,
    cpuUsPerReq: ok ? ((snap1.cpuS - cpu0) * 1e6) / ok : null,
    peakRssMb: Math.max(peakRss, snap1.rssKb) / 1024,
  };
}

// ---------------------------------------------------------------- phases
const PAYLOAD_LABEL = (p) => (p >= 1024 && p % 1024 === 0 ? `${p / 1024} KB` : `${p} B`);

async function phaseLoad(t, R) {
  log(`[load] ${t.label}`);
  const srv = await startServer(t.kind);
  try {
    for (const payload of PAYLOADS) {
      for (const C of CONCS) {
        const cell = await loadCell(t, srv, C, payload, DUR, WARMUP, R.errors);
        R.cells[`${C}/${payload}`] = cell;
        log(
          `  C=${C} ${PAYLOAD_LABEL(payload)}: ${fmt(cell.rps)} req/s  p50 ${fmt(cell.p50)} µs  p99 ${fmt(cell.p99)} µs  ` +
            `cpu ${fmt(cell.cpuUsPerReq)} µs/req  errors so far ${R.errors.total}`,
        );
        if (srv.alive && !srv.alive()) throw new Error(`${t.label}: server died:\n${srv.tail()}`);
      }
    }
  } finally {
    await srv.stop();
  }
}

/**
 * The same load cell quiet and during a reload loop: the config file is rewritten (a server "extra" added,
 * then removed: a child started, then stopped), the proxy's watcher reloads it, and the next write waits
 * until /readyz shows the change and RELOAD_PAUSE_MS more. The echo server is unchanged throughout, so
 * its sessions must see nothing but the cost of the reloads.
 */
async function phaseReload(t, R) {
  if (t.kind !== "ours") return;
  log(`[reload] ${t.label}`);
  const C = Math.max(...CONCS);
  const payload = Math.min(...PAYLOADS);
  const srv = await startServer("ours");
  const port = Number(new URL(srv.base).port);
  try {
    R.reloadQuiet = await loadCell(t, srv, C, payload, DUR, WARMUP, R.errors);
    let looping = true;
    let reloads = 0;
    const loop = (async () => {
      for (let extra = true; looping; extra = !extra) {
        const servers = extra ? { ...BASE_SERVERS, extra: { command: NODE, args: [ECHO] } } : BASE_SERVERS;
        fs.writeFileSync(CONFIG, JSON.stringify({ mcpServers: servers }));
        const deadline = performance.now() + 10_000;
        while (looping && performance.now() < deadline && (await readyzHas(port, "extra")) !== extra) await sleep(10);
        reloads++;
        await sleep(RELOAD_PAUSE_MS);
      }
    })();
    R.reloadLoop = await loadCell(t, srv, C, payload, DUR, WARMUP, R.errors);
    looping = false;
    await loop;
    R.reloadLoop.reloads = reloads;
    log(`  quiet p99 ${fmt(R.reloadQuiet.p99)} µs, during ${reloads} reloads p99 ${fmt(R.reloadLoop.p99)} µs, errors so far ${R.errors.total}`);
  } finally {
    fs.writeFileSync(CONFIG, JSON.stringify({ mcpServers: BASE_SERVERS }));
    await srv.stop();
  }
}

/** Whether /readyz (detailed: no token on loopback) lists server `name`. */
function readyzHas(port, name) {
  return new Promise((resolve) => {
    const req = http.get({ host: "127.0.0.1", port, path: "/readyz", timeout: 1000 }, (res) => {
      let body = "";
      res.on("data", (d) => (body += d));
      res.on("end", () => {
        try {
          resolve(name in (JSON.parse(body).servers ?? {}));
        } catch {
          resolve(null);
        }
      });
    });
    req.on("timeout", () => req.destroy());
    req.on("error", () => resolve(null));
  });
}

function reloadTable(res) {
  const rows = ["| target | cell | req/s quiet | req/s during reloads | p50 quiet µs | p50 during | p99 quiet µs | p99 during | max during µs | reloads applied |", "|---|---|---|---|---|---|---|---|---|---|"];
  for (const t of TARGETS) {
    const r = res[t.key];
    if (!r.reloadQuiet) continue;
    const q = r.reloadQuiet;
    const l = r.reloadLoop;
    rows.push(`| ${t.label} | C=${q.C} ${PAYLOAD_LABEL(q.payload)} | ${fmt(q.rps)} | ${fmt(l.rps)} | ${fmt(q.p50)} | ${fmt(l.p50)} | ${fmt(q.p99)} | ${fmt(l.p99)} | ${fmt(l.max)} | ${l.reloads} |`);
  }
  return rows.join("\n");
}

/** Spawn -> first initialize answered, COLD_TRIALS times; a fresh process each time. */
async function phaseColdStart(t, R) {
  log(`[cold start] ${t.label}`);
  const times = [];
  for (let trial = 0; trial < COLD_TRIALS; trial++) {
    if (t.kind === "direct") {
      const t0 = performance.now();
      const peer = new StdioPeer(null, spawnEcho);
      try {
        await peer.request({ jsonrpc: "2.0", id: 0, method: "initialize", params: { protocolVersion: "2025-06-18", capabilities: {}, clientInfo: { name: "bench", version: "1" } } }, 30_000);
        times.push(performance.now() - t0);
      } catch (e) {
        R.errors.add(e);
      } finally {
        await Promise.race([peer.close(), sleep(4000)]);
        await stopProcess(peer.child);
      }
      continue;
    }
    const port = await freePort();
    const agent = makeAgent();
    const t0 = performance.now();
    const cp = spawnServerProcess(t.kind, port);
    try {
      const deadline = t0 + 30_000;
      let done = false;
      // Poll every 5 ms: connection refused / 503 while starting, then initialize answered.
      for (let i = 0; i < 6000 && !done && performance.now() < deadline; i++) {
        if (cp.exitCode !== null) throw new Error(`exited during cold start:\n${cp.tail()}`);
        const s = makeSession(t.transport, { url: `http://127.0.0.1:${port}${t.path}`, agent, timeoutMs: 5000 });
        try {
          await s.open();
          times.push(s.initAt - t0);
          done = true;
        } catch {
          await sleep(5);
        } finally {
          s.drop();
        }
      }
      if (!done) R.errors.add(new Error("cold start: no initialize answer within 30 s"), "coldstart");
    } finally {
      agent.destroy();
      await stopProcess(cp);
    }
  }
  R.coldMs = median(times);
  log(`  spawn -> initialize: ${times.map((x) => x.toFixed(0)).join(", ")} ms`);
}

/** RSS at idle, with 32 idle sessions and with N idle sessions; probe latency at 32 and N. */
async function phaseIdle(t, R) {
  if (t.kind === "relay") return; // the HTTP floor's sessions plus one child: nothing the floor does not show
  const holdsSocket = t.transport === "sse" || (t.transport === "streamable" && IDLE_GET);
  // Each held session is one socket in this process and one in the server: stay under RLIMIT_NOFILE.
  const cap = holdsSocket ? Math.min(SESSIONS, fdLimit() - 600) : SESSIONS;
  log(`[idle sessions] ${t.label}: 32, then ${fmt(cap)}${cap < SESSIONS ? ` (capped by the fd limit ${fdLimit()})` : ""}`);
  const srv = await startServer(t.kind);
  const agent = makeAgent();
  const all = [];
  try {
    await sleep(1000); // let start-up garbage settle
    const snap0 = snapshotPids(srv.pids());
    R.rssIdleMb = snap0.rssKb / 1024;
    R.rssOwnIdleMb = rssKb(srv.ownPid) / 1024;
    const extra = t.transport === "streamable" && IDLE_GET ? { openGetStream: true } : {};
    const make = (from, to) => Array.from({ length: to - from }, (_, k) => newSession(t, srv, from + k, agent, extra));
    const probe = async (open) => {
      // 20 sequential calls on sessions spread over all open ones, oldest first,
      // after 100 unmeasured ones (so the first probe does not pay for JIT warm-up)
      const lat = [];
      for (let k = 0; k < 120; k++) {
        const s = open[Math.floor(((k % 20) * (open.length - 1)) / 19)];
        s.seq = (s.seq ?? 0) + 1;
        const us = await checkedCall(s, s.index, s.seq, 100, R.errors);
        if (us !== null && k >= 100) lat.push(us);
      }
      return median(lat);
    };
    const guard = () => {
      if (memAvailableMb() < 1500) return "memory guard: MemAvailable < 1500 MB";
      if (snapshotPids(srv.pids()).rssKb > 8 * 1024 * 1024) return "memory guard: server tree RSS > 8 GB";
      if (srv.alive && !srv.alive()) return "server process died";
      return null;
    };
    let r = await openSessions(make(0, 32), 32, R.errors);
    all.push(...r.opened);
    await sleep(500);
    R.rss32Mb = snapshotPids(srv.pids()).rssKb / 1024;
    R.probe32Us = await probe(all);
    r = await openSessions(make(32, cap), 64, R.errors, 180_000, guard);
    all.push(...r.opened);
    if (r.stop) R.idleStop = r.stop;
    await sleep(1000);
    R.idleN = all.length;
    R.rssNMb = snapshotPids(srv.pids()).rssKb / 1024;
    R.kbPerSession = ((R.rssNMb - R.rssIdleMb) * 1024) / all.length;
    R.probeNUs = await probe(all);
    // every session (and, for direct, the pipe) was created in this phase: count all their strays
    R.errors.addN("stray", strayCount(t, srv, all), "response for an id not in flight on this session");
    log(`  idle ${fmt(R.rssIdleMb, 1)} MB, 32: ${fmt(R.rss32Mb, 1)} MB, ${fmt(all.length)}: ${fmt(R.rssNMb, 1)} MB (${fmt(R.kbPerSession, 1)} KB/session); probe p50 ${fmt(R.probe32Us)} -> ${fmt(R.probeNUs)} µs${r.stop ? `; stopped: ${r.stop}` : ""}`);
  } finally {
    for (const s of all) s.drop();
    agent.destroy();
    await srv.stop();
  }
}

/** Leak check: one proxy per transport x payload, ROUNDS rounds (open LEAK_C sessions, load DUR s, close), RSS after each. */
async function leakCheck() {
  const rows = [];
  for (const t of TARGETS.filter((x) => x.kind === "ours")) {
    for (const payload of PAYLOADS) {
      log(`[leak] ${t.label} ${PAYLOAD_LABEL(payload)}: ${ROUNDS} rounds of ${DUR} s at C=${LEAK_C}`);
      const errs = new Errors();
      const srv = await startServer(t.kind);
      const row = { t, payload, start: 0, rss: [], own: [], reqs: [], errs };
      try {
        await sleep(500);
        row.start = snapshotPids(srv.pids()).rssKb / 1024;
        for (let round = 0; round < ROUNDS; round++) {
          const cell = await loadCell(t, srv, LEAK_C, payload, DUR, 0, errs);
          await sleep(QUICK ? 500 : 1000);
          row.rss.push(snapshotPids(srv.pids()).rssKb / 1024);
          row.own.push(rssKb(srv.ownPid) / 1024);
          row.reqs.push(cell.ok);
          if (srv.alive && !srv.alive()) throw new Error(`${t.label}: proxy died:\n${srv.tail()}`);
        }
      } finally {
        await srv.stop();
      }
      log(`  RSS MB: ${row.rss.map((x) => x.toFixed(0)).join(" ")}; errors ${errs.total}`);
      rows.push(row);
    }
  }
  return rows;
}

// ---------------------------------------------------------------- formatting
function fmt(x, digits = 0) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return x.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}
const ratio = (a, b) => (a == null || b == null || !b ? "–" : `${(a / b).toFixed(2)}×`);

function mainTable(res) {
  const get = (key, f) => (res[key] ? f(res[key]) : null);
  const cols = [
    ["direct", null],
    ["http-sse", null],
    ["relay-sse", null],
    ["ours-sse", ["http-sse", "direct", "relay-sse"]],
    ["http-stream", null],
    ["relay-stream", null],
    ["ours-stream", ["http-stream", "direct", "relay-stream"]],
    ["ours-modern", ["ours-stream"]],
  ];
  const head = ["metric", "direct stdio", "HTTP floor SSE", "relay SSE", "ours SSE", "÷ HTTP floor", "÷ direct", "÷ relay",
    "HTTP floor Streamable", "relay Streamable", "ours Streamable", "÷ HTTP floor", "÷ direct", "÷ relay",
    "ours 2026-07-28", "÷ ours Streamable"];
  const out = [`| ${head.join(" | ")} |`, `|${head.map((_, i) => (i ? "---:" : "---")).join("|")}|`];
  // row(label, f(result) -> number | string, digits, withRatios)
  const row = (label, f, digits = 0, withRatios = true) => {
    const cells = [label];
    if (cols.every(([key]) => get(key, f) == null)) return; // phase or targets not run: no row
    for (const [key, floors] of cols) {
      const v = get(key, f);
      cells.push(typeof v === "string" ? v : fmt(v, digits));
      if (floors) {
        for (const fk of floors) {
          const fv = get(fk, f);
          cells.push(withRatios && typeof v === "number" && typeof fv === "number" ? ratio(v, fv) : "–");
        }
      }
    }
    out.push(`| ${cells.join(" | ")} |`);
  };
  const cell = (C, p) => (r) => r.cells[`${C}/${p}`];
  if (CONCS.includes(1)) {
    for (const p of PAYLOADS) {
      for (const q of ["p50", "p90", "p99"]) row(`${q} latency, C=1, ${PAYLOAD_LABEL(p)} (µs)`, (r) => cell(1, p)(r)?.[q]);
    }
  }
  for (const p of PAYLOADS) for (const C of CONCS) row(`req/s, C=${C}, ${PAYLOAD_LABEL(p)} (correct only)`, (r) => cell(C, p)(r)?.rps);
  for (const p of PAYLOADS) for (const C of CONCS) row(`tree CPU per request, C=${C}, ${PAYLOAD_LABEL(p)} (µs)`, (r) => cell(C, p)(r)?.cpuUsPerReq, 1);
  row("RSS idle, tree (MB)", (r) => r.rssIdleMb, 1);
  row("RSS idle, server process alone (MB)", (r) => r.rssOwnIdleMb, 1);
  row("RSS with 32 idle sessions, tree (MB)", (r) => r.rss32Mb, 1);
  row(`RSS with N=${fmt(SESSIONS)} idle sessions, tree (MB)`, (r) => (r.idleN != null && r.idleN !== SESSIONS ? `${fmt(r.rssNMb, 1)} (N=${fmt(r.idleN)})` : r.rssNMb), 1);
  row("RSS per idle session, (N − idle) / N (KB)", (r) => r.kbPerSession, 1);
  row("probe p50 with 32 idle sessions (µs)", (r) => r.probe32Us);
  row("probe p50 with N idle sessions (µs)", (r) => r.probeNUs);
  row("spawn → first initialize answered (ms)", (r) => r.coldMs, 1);
  row("errors, all phases (of which wrong-session)", (r) => `${fmt(r.errors.total)} (${fmt(r.errors.misrouted)})`, 0, false);
  return out.join("\n");
}

function targetsTable(res) {
  // The ratios issue 3 sets targets for that need only the floors (peer targets need ../shared/bench).
  const v = (k, f) => (res[k] ? f(res[k]) : null);
  const c = (C, p) => (r) => r.cells[`${C}/${p}`];
  const small = Math.min(...PAYLOADS);
  const big = Math.max(...PAYLOADS);
  const Cmax = Math.max(...CONCS);
  const lines = [
    "| target (issue 3) | SSE | Streamable |",
    "|---|---:|---:|",
  ];
  const line = (label, f) => lines.push(`| ${label} | ${f("sse")} | ${f("stream")} |`);
  if (CONCS.includes(1)) {
    line(`p50 C=1 ${PAYLOAD_LABEL(small)} ÷ (HTTP floor p50 + direct p50), ≤ 0.8`, (tr) => {
      const o = v(`ours-${tr}`, (r) => c(1, small)(r)?.p50);
      const h = v(`http-${tr}`, (r) => c(1, small)(r)?.p50);
      const d = v("direct", (r) => c(1, small)(r)?.p50);
      return o != null && h != null && d != null ? (o / (h + d)).toFixed(2) : "–";
    });
  }
  line(`req/s C=${Cmax} ${PAYLOAD_LABEL(small)} ÷ HTTP floor, ≥ 0.8`, (tr) => ratio(v(`ours-${tr}`, (r) => c(Cmax, small)(r)?.rps), v(`http-${tr}`, (r) => c(Cmax, small)(r)?.rps)));
  line(`req/s C=${Cmax} ${PAYLOAD_LABEL(big)} ÷ direct, ≥ 0.8`, (tr) => ratio(v(`ours-${tr}`, (r) => c(Cmax, big)(r)?.rps), v("direct", (r) => c(Cmax, big)(r)?.rps)));
  // Not targets of the issue: how far ours is from the leanest two-hop relay (bench/http-floor.mjs --relay).
  if (CONCS.includes(1)) line(`p50 C=1 ${PAYLOAD_LABEL(small)} ÷ two-hop relay (no target)`, (tr) => ratio(v(`ours-${tr}`, (r) => c(1, small)(r)?.p50), v(`relay-${tr}`, (r) => c(1, small)(r)?.p50)));
  for (const p of new Set([small, big])) {
    line(`req/s C=${Cmax} ${PAYLOAD_LABEL(p)} ÷ two-hop relay (no target)`, (tr) => ratio(v(`ours-${tr}`, (r) => c(Cmax, p)(r)?.rps), v(`relay-${tr}`, (r) => c(Cmax, p)(r)?.rps)));
    line(`CPU per request C=${Cmax} ${PAYLOAD_LABEL(p)} ÷ two-hop relay (no target)`, (tr) => ratio(v(`ours-${tr}`, (r) => c(Cmax, p)(r)?.cpuUsPerReq), v(`relay-${tr}`, (r) => c(Cmax, p)(r)?.cpuUsPerReq)));
  }
  line("RSS per idle session, ≤ 6 KB", (tr) => fmt(v(`ours-${tr}`, (r) => r.kbPerSession), 1));
  line("proxy process RSS at idle, ≤ 50 MB", (tr) => fmt(v(`ours-${tr}`, (r) => r.rssOwnIdleMb), 1));
  line("probe p50 with N ÷ with 32 idle sessions (flat ≈ 1)", (tr) => ratio(v(`ours-${tr}`, (r) => r.probeNUs), v(`ours-${tr}`, (r) => r.probe32Us)));
  line("wrong-session responses, = 0", (tr) => fmt(v(`ours-${tr}`, (r) => r.errors.misrouted)));
  return lines.join("\n");
}

function leakTable(rows) {
  const head = ["transport", "payload", "start", ...Array.from({ length: ROUNDS }, (_, i) => `r${i + 1}`), `r5→r${ROUNDS}`, "plateau?", `proxy alone r5→r${ROUNDS}`, "requests", "errors"];
  const out = [`| ${head.join(" | ")} |`, `|${head.map((_, i) => (i < 2 ? "---" : "---:")).join("|")}|`];
  for (const r of rows) {
    const r5 = r.rss[Math.min(4, r.rss.length - 1)];
    const rl = r.rss[r.rss.length - 1];
    const growth = rl - r5;
    // noise allowance: 5 MB or 5 % of round-5 RSS, whichever is larger
    const plateau = growth <= Math.max(5, 0.05 * r5);
    out.push(
      `| ${r.t.label} | ${PAYLOAD_LABEL(r.payload)} | ${fmt(r.start, 0)} | ${r.rss.map((x) => fmt(x, 0)).join(" | ")} | ${growth >= 0 ? "+" : ""}${fmt(growth, 1)} MB | ${plateau ? "yes" : "**NO**"} | ${fmt(r.own[Math.min(4, r.own.length - 1)], 0)} → ${fmt(r.own[r.own.length - 1], 0)} MB | ${fmt(r.reqs.reduce((a, b) => a + b, 0))} | ${fmt(r.errs.total)} (${fmt(r.errs.misrouted)} wrong-session) |`,
    );
  }
  return out.join("\n");
}

function header(mode) {
  const cpu = os.cpus();
  return [
    `## remote-mcp-proxy benchmark${mode}: ${new Date().toISOString()}`,
    "",
    `node ${process.version}, ${cpu.length} × ${cpu[0]?.model ?? "cpu"}, load average at start ${os.loadavg().map((x) => x.toFixed(2)).join(" ")}; ` +
      `DUR=${DUR}s WARMUP=${WARMUP}s CONCS=${CONCS.join(",")} PAYLOADS=${PAYLOADS.join(",")}` +
      (mode ? ` ROUNDS=${ROUNDS} C=${LEAK_C}` : ` SESSIONS=${SESSIONS}${IDLE_GET ? " (Streamable idle sessions hold a GET stream)" : ""} COLD_TRIALS=${COLD_TRIALS}`) +
      (QUICK ? " (QUICK)" : ""),
    "",
  ].join("\n");
}

// ---------------------------------------------------------------- main
async function main() {
  const t0 = performance.now();
  if (LEAK) {
    const hdr = header(" — leak check");
    const rows = await leakCheck();
    console.log(`${hdr}\n${leakTable(rows)}\n\nRSS of the proxy tree (proxy + echo child) in MB, ${QUICK ? "0.5" : "1"} s after each round; each round opens ${LEAK_C} sessions, loads them for ${DUR} s, closes them. Plateau = growth from round 5 to round ${ROUNDS} ≤ max(5 MB, 5 %).`);
    if (env.OUT) fs.writeFileSync(env.OUT, JSON.stringify(rows.map((r) => ({ ...r, t: r.t.key, errs: r.errs })), null, 2));
    return;
  }
  const hdr = header("");
  const res = {};
  for (const t of TARGETS) res[t.key] = { cells: {}, errors: new Errors() };
  // Phase order: cold start (quiet machine), load matrix, idle sessions.
  if (PHASES.includes("cold")) for (const t of TARGETS) await phaseColdStart(t, res[t.key]);
  if (PHASES.includes("load")) for (const t of TARGETS) await phaseLoad(t, res[t.key]);
  // 2026-07-28 has no sessions to hold idle.
  if (PHASES.includes("idle")) for (const t of TARGETS) if (t.transport !== "modern") await phaseIdle(t, res[t.key]);
  if (PHASES.includes("reload")) for (const t of TARGETS) await phaseReload(t, res[t.key]);
  const notes = [];
  if (PHASES.includes("idle") && SESSIONS < 2000) notes.push(`- SESSIONS=${SESSIONS}: at small N the KB per idle session is mostly heap noise; use SESSIONS ≥ 2000 for that row.`);
  for (const t of TARGETS) {
    const r = res[t.key];
    if (r.idleStop) notes.push(`- ${t.label}: idle-session phase stopped early: ${r.idleStop}`);
    if (r.errors.total) notes.push(`- ${t.label}: errors ${JSON.stringify(r.errors.kinds)}; first: ${JSON.stringify(r.errors.first)}`);
  }
  console.log(
    [
      hdr,
      mainTable(res),
      "",
      targetsTable(res),
      ...(PHASES.includes("reload") ? ["", reloadTable(res)] : []),
      "",
      "Ratios are ours ÷ floor (for req/s higher is better, for everything else lower). \"tree\" = the server process and its descendants " +
        "(ours and the relay: server + echo child; HTTP floor: its one process; direct: the echo child). The two-hop relay is bench/http-floor.mjs --relay: the HTTP floor with the echo child behind one pipe (ids swapped, one write per message, no checks). CPU = utime+stime of the tree over the measured window ÷ correct responses. " +
        `Idle sessions: SSE = an open stream + initialize; Streamable = initialize only${IDLE_GET ? " + a GET stream" : ""}. Probe = 20 sequential 100 B calls spread over the open sessions.`,
      notes.length ? `\nNotes:\n${notes.join("\n")}` : "",
      `\n(${((performance.now() - t0) / 1000).toFixed(0)} s)`,
    ].join("\n"),
  );
  if (env.OUT) {
    const plain = Object.fromEntries(Object.entries(res).map(([k, r]) => [k, { ...r, errors: { kinds: r.errors.kinds, first: r.errors.first } }]));
    fs.writeFileSync(env.OUT, JSON.stringify({ settings: { DUR, WARMUP, CONCS, PAYLOADS, SESSIONS, IDLE_GET, COLD_TRIALS }, results: plain }, null, 2));
  }
}

main().then(
  async () => {
    await stopAll();
    removeTmp();
    process.exit(0);
  },
  async (e) => {
    console.error(`bench: failed: ${e?.stack ?? e}`);
    await stopAll();
    removeTmp();
    process.exit(1);
  },
);
