// Adapted from ../shared/bench/lib/clients.mjs (our project's benchmark harness).
// Changes: sessions record `initAt` (performance.now() when initialize was
// answered, for cold-start timing), `drop()` abandons a session without a
// DELETE (idle-session phase), StdioPeer spawns without a shell (argv array) and
// detached via the caller's process registry.
//
// Raw MCP client sessions for benchmarking: legacy HTTP+SSE, Streamable HTTP,
// and direct stdio. Only node:http / node:child_process — no SDK — so the client
// cost is small and identical for every target.
//
// Every session exposes:
//   await s.open()                 transport handshake + initialize + initialized
//   await s.call(msgWithoutId)     one JSON-RPC request, resolves {msg, latencyUs}
//   await s.close()
//   s.stats                        per-session counters (stray, notifications, ...)
// Request ids are per session, starting at 0 for initialize, like the SDK
// (`idBase` shifts them, e.g. to make ids unique across sessions).

import http from "node:http";
import { spawn } from "node:child_process";
import { performance } from "node:perf_hooks";

export const DEFAULT_PROTOCOL = "2025-06-18";
export const SSE_PROTOCOL = "2024-11-05";

export class BenchError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind; // timeout | http | rpc | session_lost | connect | protocol
  }
}

export function makeAgent() {
  return new http.Agent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 4096 });
}

function assertLoopback(u) {
  const h = u.hostname.replace(/^\[|\]$/g, "");
  if (!(h === "localhost" || h === "::1" || /^127\./.test(h))) {
    throw new Error(`refusing non-loopback target ${u.host}: this harness only talks to 127.0.0.0/8, ::1, localhost`);
  }
}

// ---------- SSE parsing ----------
// Incremental text/event-stream parser. Calls onEvent({event, data, id}).
export class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buf = "";
    this.event = "";
    this.data = [];
    this.id = undefined;
  }
  push(chunk) {
    this.buf += chunk;
    let start = 0;
    const b = this.buf;
    for (;;) {
      // find next line terminator: \n, \r\n or \r
      let i = b.indexOf("\n", start);
      const r = b.indexOf("\r", start);
      let end, next;
      if (r !== -1 && (i === -1 || r < i)) {
        if (r === b.length - 1) break; // \r at end: may be \r\n split across chunks
        end = r;
        next = b[r + 1] === "\n" ? r + 2 : r + 1;
      } else if (i !== -1) {
        end = i;
        next = i + 1;
      } else break;
      this.line(b.slice(start, end));
      start = next;
    }
    this.buf = start ? b.slice(start) : b;
  }
  line(l) {
    if (l === "") {
      if (this.data.length) this.onEvent({ event: this.event || "message", data: this.data.join("\n"), id: this.id });
      this.event = "";
      this.data = [];
      return;
    }
    if (l[0] === ":") return;
    const c = l.indexOf(":");
    const field = c === -1 ? l : l.slice(0, c);
    let value = c === -1 ? "" : l.slice(c + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id") this.id = value;
  }
}

// ---------- tiny HTTP helper ----------
function httpRequest({ url, method, headers, body, agent, timeoutMs, onResponse }) {
  return new Promise((resolve, reject) => {
    const u = url instanceof URL ? url : new URL(url);
    const req = http.request(
      {
        host: u.hostname.replace(/^\[|\]$/g, ""),
        port: u.port,
        path: u.pathname + u.search,
        method,
        headers,
        agent,
      },
      (res) => {
        if (onResponse) return onResponse(res, resolve, reject, req);
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString("utf8") }));
        res.on("error", reject);
      },
    );
    let timer;
    if (timeoutMs) {
      timer = setTimeout(() => {
        req.destroy(new BenchError("timeout", `${method} ${u.pathname} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      req.on("close", () => clearTimeout(timer));
    }
    req.on("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    if (body !== undefined) req.end(body);
    else req.end();
  });
}

// Retry once when a pooled keep-alive socket turned out to be closed by the server.
async function httpRequestRetry(opts) {
  try {
    return await httpRequest(opts);
  } catch (e) {
    if ((e.code === "ECONNRESET" || e.code === "EPIPE") && !opts._retried) {
      return httpRequest({ ...opts, _retried: true });
    }
    throw e;
  }
}

function kindOf(e) {
  if (e instanceof BenchError) return e.kind;
  return "connect";
}

// Socket-level failures (refused, reset) are "connect"; anything else is "http".
function wrapErr(e) {
  if (e instanceof BenchError) return e;
  return new BenchError(e && e.code ? "connect" : "http", `${e?.code ?? ""} ${e?.message ?? e}`.trim());
}

function initializeMsg(id, protocolVersion) {
  return {
    jsonrpc: "2.0",
    id,
    method: "initialize",
    params: {
      protocolVersion,
      capabilities: {},
      clientInfo: { name: "mcp-bench-load", version: "1.0.0" },
    },
  };
}

/** BENCH_TOKEN: a bearer token sent on every request (the proxy is started with it), to measure auth's cost. */
const AUTH = process.env.BENCH_TOKEN ? { Authorization: `Bearer ${process.env.BENCH_TOKEN}` } : {};

class BaseSession {
  constructor(opts) {
    this.opts = opts;
    this.index = opts.index ?? 0;
    this.nextId = opts.idBase ?? 0;
    this.timeoutMs = opts.timeoutMs ?? 10000;
    this.stats = { stray: 0, notifications: 0, serverRequests: 0 };
    this.closed = false;
  }
  newId() {
    return this.nextId++;
  }
  // abandon the session (no DELETE); transports with a stream override this
  drop() {
    this.closed = true;
  }
}

// ---------- legacy HTTP+SSE ----------
export class SseSession extends BaseSession {
  constructor(opts) {
    super(opts);
    this.url = new URL(opts.url);
    assertLoopback(this.url);
    this.agent = opts.agent ?? makeAgent();
    this.pending = new Map(); // id -> {resolve, reject, timer}
    this.protocolVersion = opts.protocolVersion ?? SSE_PROTOCOL;
  }

  open() {
    return new Promise((resolve, reject) => {
      let endpointSeen = false;
      const fail = (e) => {
        if (!endpointSeen) reject(e);
        else this.lose(e);
      };
      const timer = setTimeout(() => {
        fail(new BenchError("timeout", "no endpoint event within timeout"));
        this.getReq?.destroy();
      }, this.timeoutMs);
      const parser = new SseParser((ev) => {
        if (ev.event === "endpoint") {
          if (endpointSeen) return;
          endpointSeen = true;
          clearTimeout(timer);
          this.postUrl = new URL(ev.data.trim(), this.url);
          assertLoopback(this.postUrl);
          this.handshake().then(resolve, reject);
          return;
        }
        if (ev.event === "message") this.onMessage(ev.data);
      });
      const u = this.url;
      this.getReq = http.request(
        {
          host: u.hostname.replace(/^\[|\]$/g, ""),
          port: u.port,
          path: u.pathname + u.search,
          method: "GET",
          headers: { Accept: "text/event-stream", "Cache-Control": "no-cache", ...AUTH },
          agent: false, // long-lived: keep it out of the pool
        },
        (res) => {
          if (res.statusCode !== 200) {
            clearTimeout(timer);
            res.resume();
            return fail(new BenchError("http", `GET ${u.pathname} -> HTTP ${res.statusCode}`));
          }
          res.setEncoding("utf8");
          res.on("data", (c) => parser.push(c));
          res.on("end", () => fail(new BenchError("session_lost", "SSE stream ended")));
          res.on("error", (e) => fail(new BenchError("session_lost", `SSE stream error: ${e.message}`)));
        },
      );
      this.getReq.on("error", (e) => {
        clearTimeout(timer);
        fail(new BenchError(endpointSeen ? "session_lost" : "connect", e.message));
      });
      this.getReq.end();
    });
  }

  lose(e) {
    if (this.closed) return;
    this.closed = true;
    this.lost = e;
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(e);
    }
    this.pending.clear();
  }

  async handshake() {
    const id = this.newId();
    const r = await this.request(initializeMsg(id, this.protocolVersion));
    this.initAt = performance.now();
    if (r.msg.error) throw new BenchError("rpc", `initialize error: ${JSON.stringify(r.msg.error)}`);
    this.initResult = r.msg.result;
    await this.notify({ jsonrpc: "2.0", method: "notifications/initialized" });
  }

  onMessage(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      this.stats.stray++;
      return;
    }
    if (Array.isArray(msg)) {
      for (const m of msg) this.dispatch(m);
    } else this.dispatch(msg);
  }

  dispatch(msg) {
    if (msg.method !== undefined) {
      if (msg.id !== undefined) {
        this.stats.serverRequests++;
        // answer pings so a server that probes us is not left waiting
        if (msg.method === "ping") this.post({ jsonrpc: "2.0", id: msg.id, result: {} }).catch(() => {});
      } else this.stats.notifications++;
      return;
    }
    const p = this.pending.get(msg.id);
    if (!p) {
      this.stats.stray++; // a response for no request in flight here: someone else's
      return;
    }
    this.pending.delete(msg.id);
    p.gotMsg = msg;
    p.msgAt = performance.now();
    if (p.postDone) p.finish();
  }

  post(msg) {
    return httpRequestRetry({
      url: this.postUrl,
      method: "POST",
      headers: { "Content-Type": "application/json", ...AUTH },
      body: JSON.stringify(msg),
      agent: this.agent,
      timeoutMs: this.timeoutMs,
    });
  }

  async notify(msg) {
    const r = await this.post(msg).catch((e) => {
      throw wrapErr(e);
    });
    if (r.status < 200 || r.status >= 300) throw new BenchError("http", `POST notification -> HTTP ${r.status}: ${r.body.slice(0, 200)}`);
  }

  // Resolves when BOTH the POST has been answered (202) and the response
  // message arrived on the stream; latency is to the later of the two.
  request(msg) {
    if (this.closed) return Promise.reject(this.lost ?? new BenchError("session_lost", "session closed"));
    return new Promise((resolve, reject) => {
      const t0 = performance.now();
      const p = { postDone: false, gotMsg: null, reject };
      p.finish = () => {
        clearTimeout(p.timer);
        const end = performance.now();
        resolve({ msg: p.gotMsg, latencyUs: (end - t0) * 1000 });
      };
      p.timer = setTimeout(() => {
        this.pending.delete(msg.id);
        reject(new BenchError("timeout", `no response to id ${msg.id} within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.pending.set(msg.id, p);
      this.post(msg).then(
        (r) => {
          if (r.status < 200 || r.status >= 300) {
            clearTimeout(p.timer);
            this.pending.delete(msg.id);
            return reject(new BenchError("http", `POST -> HTTP ${r.status}: ${r.body.slice(0, 200)}`));
          }
          p.postDone = true;
          if (p.gotMsg) p.finish();
        },
        (e) => {
          clearTimeout(p.timer);
          this.pending.delete(msg.id);
          reject(wrapErr(e));
        },
      );
    });
  }

  call(body) {
    return this.request({ jsonrpc: "2.0", id: this.newId(), ...body });
  }

  async close() {
    this.closed = true;
    this.getReq?.destroy();
  }

  drop() {
    this.closed = true;
    this.getReq?.destroy();
  }
}

// ---------- Streamable HTTP ----------
export class StreamableSession extends BaseSession {
  constructor(opts) {
    super(opts);
    this.url = new URL(opts.url);
    assertLoopback(this.url);
    this.agent = opts.agent ?? makeAgent();
    this.protocolVersion = opts.protocolVersion ?? DEFAULT_PROTOCOL;
    this.sessionId = undefined;
    this.openGetStream = !!opts.openGetStream;
  }

  headers(extra) {
    const h = {
      "Content-Type": "application/json",
      Accept: "application/json, text/event-stream",
      ...AUTH,
      ...extra,
    };
    if (this.sessionId) h["Mcp-Session-Id"] = this.sessionId;
    if (this.negotiated) h["MCP-Protocol-Version"] = this.negotiated;
    return h;
  }

  async open() {
    const id = this.newId();
    const r = await this.request(initializeMsg(id, this.protocolVersion), true);
    this.initAt = performance.now();
    if (r.msg.error) throw new BenchError("rpc", `initialize error: ${JSON.stringify(r.msg.error)}`);
    this.initResult = r.msg.result;
    this.negotiated = r.msg.result?.protocolVersion;
    await this.notify({ jsonrpc: "2.0", method: "notifications/initialized" });
    if (this.openGetStream && this.sessionId) await this.startGetStream();
  }

  // Standalone GET stream for server->client notifications (what SDK clients hold open).
  startGetStream() {
    return new Promise((resolve) => {
      const u = this.url;
      const parser = new SseParser((ev) => {
        if (ev.event === "message") this.stats.notifications++;
      });
      this.getReq = http.request(
        {
          host: u.hostname.replace(/^\[|\]$/g, ""),
          port: u.port,
          path: u.pathname + u.search,
          method: "GET",
          headers: this.headers({ Accept: "text/event-stream" }),
          agent: false,
        },
        (res) => {
          this.getStatus = res.statusCode;
          if (res.statusCode !== 200) {
            res.resume();
            return resolve();
          }
          res.setEncoding("utf8");
          res.on("data", (c) => parser.push(c));
          res.on("end", () => {
            if (!this.closed) this.getLost = true;
          });
          res.on("error", () => {});
          resolve();
        },
      );
      this.getReq.on("error", () => resolve());
      this.getReq.end();
    });
  }

  async notify(msg) {
    const r = await httpRequestRetry({
      url: this.url,
      method: "POST",
      headers: this.headers(),
      body: JSON.stringify(msg),
      agent: this.agent,
      timeoutMs: this.timeoutMs,
    }).catch((e) => {
      throw wrapErr(e);
    });
    if (r.status < 200 || r.status >= 300) throw new BenchError("http", `POST notification -> HTTP ${r.status}: ${r.body.slice(0, 200)}`);
  }

  request(msg, isInit = false, extraHeaders = undefined) {
    const t0 = performance.now();
    const id = msg.id;
    const onResponse = (res, resolve, reject) => {
      if (isInit) {
        const sid = res.headers["mcp-session-id"];
        if (sid) this.sessionId = Array.isArray(sid) ? sid[0] : sid;
      }
      const ct = String(res.headers["content-type"] || "");
      res.setEncoding("utf8");
      if (res.statusCode < 200 || res.statusCode >= 300) {
        let body = "";
        res.on("data", (c) => (body += c));
        res.on("end", () => reject(new BenchError("http", `POST -> HTTP ${res.statusCode}: ${body.slice(0, 200)}`)));
        return;
      }
      let found = null;
      const consider = (m) => {
        if (m.method !== undefined) {
          if (m.id !== undefined) this.stats.serverRequests++;
          else this.stats.notifications++;
          return;
        }
        if (m.id === id && !found) found = m;
        else this.stats.stray++;
      };
      const considerText = (text) => {
        let m;
        try {
          m = JSON.parse(text);
        } catch {
          this.stats.stray++;
          return;
        }
        if (Array.isArray(m)) m.forEach(consider);
        else consider(m);
      };
      if (ct.includes("text/event-stream")) {
        const parser = new SseParser((ev) => {
          if (ev.event === "message") considerText(ev.data);
        });
        res.on("data", (c) => parser.push(c));
      } else {
        let body = "";
        res.on("data", (c) => (body += c));
        res.on("end", () => body && considerText(body));
      }
      res.on("end", () => {
        if (found) resolve({ msg: found, latencyUs: (performance.now() - t0) * 1000 });
        else reject(new BenchError("protocol", `response to id ${id} ended without a JSON-RPC response (status ${res.statusCode}, ${ct})`));
      });
      res.on("error", (e) => reject(new BenchError("http", e.message)));
    };
    return httpRequestRetry({
      url: this.url,
      method: "POST",
      headers: this.headers(extraHeaders),
      body: JSON.stringify(msg),
      agent: this.agent,
      timeoutMs: this.timeoutMs,
      onResponse,
    }).catch((e) => {
      throw wrapErr(e);
    });
  }

  call(body) {
    return this.request({ jsonrpc: "2.0", id: this.newId(), ...body });
  }

  drop() {
    this.closed = true;
    this.getReq?.destroy();
  }

  async close() {
    this.closed = true;
    this.getReq?.destroy();
    if (this.sessionId) {
      await httpRequest({
        url: this.url,
        method: "DELETE",
        headers: this.headers(),
        agent: this.agent,
        timeoutMs: 2000,
      }).catch(() => {});
    }
  }
}

// ---------- MCP 2026-07-28: sessionless ----------
// No initialize and no session: every request carries its version and capabilities in _meta and repeats the
// method (and the tool name) in headers. open() probes server/discover once, as the SDK v2 client does.
export const MODERN_PROTOCOL = "2026-07-28";
const MODERN_META = {
  "io.modelcontextprotocol/protocolVersion": MODERN_PROTOCOL,
  "io.modelcontextprotocol/clientCapabilities": {},
  "io.modelcontextprotocol/clientInfo": { name: "mcp-bench-load", version: "1.0.0" },
};

export class ModernSession extends StreamableSession {
  headers(extra) {
    return { "Content-Type": "application/json", Accept: "application/json, text/event-stream", "MCP-Protocol-Version": MODERN_PROTOCOL, ...AUTH, ...extra };
  }

  async open() {
    const r = await this.call({ method: "server/discover", params: {} });
    this.initAt = performance.now();
    if (r.msg.error || !r.msg.result?.supportedVersions?.includes(MODERN_PROTOCOL)) {
      throw new BenchError("rpc", `server/discover: ${JSON.stringify(r.msg.error ?? r.msg.result).slice(0, 200)}`);
    }
  }

  call(body) {
    const params = { ...body.params, _meta: { ...body.params?._meta, ...MODERN_META } };
    const named = params.name ?? params.uri;
    const extra = { "Mcp-Method": body.method, ...(typeof named === "string" ? { "Mcp-Name": named } : {}) };
    return this.request({ jsonrpc: "2.0", id: this.newId(), ...body, params }, false, extra);
  }

  async close() {
    this.closed = true;
  }
}

// ---------- direct stdio (the floor) ----------
// One StdioPeer = one child process; several DirectSessions may share it (ids are
// then made unique by the caller via idBase), or each may own its own.
export class StdioPeer {
  // spawnFn(stdio) -> ChildProcess; defaults to a plain detached spawn of argv.
  constructor(argv, spawnFn) {
    this.child = spawnFn ? spawnFn() : spawn(argv[0], argv.slice(1), { detached: true, stdio: ["pipe", "pipe", "inherit"] });
    this.pending = new Map();
    this.stats = { stray: 0, notifications: 0 };
    let buf = "";
    this.child.stdout.setEncoding("utf8");
    this.child.stdout.on("data", (chunk) => {
      buf += chunk;
      let start = 0;
      let nl;
      while ((nl = buf.indexOf("\n", start)) !== -1) {
        const line = buf.slice(start, nl);
        start = nl + 1;
        if (!line.trim()) continue;
        let m;
        try {
          m = JSON.parse(line);
        } catch {
          this.stats.stray++;
          continue;
        }
        if (m.method !== undefined) {
          this.stats.notifications++;
          continue;
        }
        const p = this.pending.get(m.id);
        if (!p) {
          this.stats.stray++;
          continue;
        }
        this.pending.delete(m.id);
        clearTimeout(p.timer);
        p.resolve({ msg: m, latencyUs: (performance.now() - p.t0) * 1000 });
      }
      if (start) buf = buf.slice(start);
    });
    this.exited = new Promise((r) => this.child.on("exit", r));
    this.child.on("exit", () => {
      for (const [, p] of this.pending) p.reject(new BenchError("session_lost", "child exited"));
      this.pending.clear();
    });
  }
  get pid() {
    return this.child.pid;
  }
  request(msg, timeoutMs) {
    return new Promise((resolve, reject) => {
      const p = { resolve, reject, t0: performance.now() };
      p.timer = setTimeout(() => {
        this.pending.delete(msg.id);
        reject(new BenchError("timeout", `no response to id ${msg.id}`));
      }, timeoutMs);
      this.pending.set(msg.id, p);
      this.child.stdin.write(JSON.stringify(msg) + "\n");
    });
  }
  notify(msg) {
    this.child.stdin.write(JSON.stringify(msg) + "\n");
  }
  async close() {
    this.child.stdin.end();
    const t = setTimeout(() => this.child.kill("SIGKILL"), 3000);
    await this.exited;
    clearTimeout(t);
  }
}

export class DirectSession extends BaseSession {
  constructor(opts) {
    super(opts);
    this.peer = opts.peer; // shared StdioPeer, or undefined to own one
    this.ownsPeer = !this.peer;
    this.cmd = opts.cmd;
    this.protocolVersion = opts.protocolVersion ?? DEFAULT_PROTOCOL;
  }
  async open() {
    if (this.ownsPeer) this.peer = new StdioPeer(this.cmd, this.opts.spawnFn);
    const r = await this.peer.request(initializeMsg(this.newId(), this.protocolVersion), this.timeoutMs);
    if (r.msg.error) throw new BenchError("rpc", JSON.stringify(r.msg.error));
    this.initResult = r.msg.result;
    this.peer.notify({ jsonrpc: "2.0", method: "notifications/initialized" });
  }
  call(body) {
    return this.peer.request({ jsonrpc: "2.0", id: this.newId(), ...body }, this.timeoutMs);
  }
  async close() {
    this.closed = true;
    if (this.ownsPeer) await this.peer.close();
  }
}

export function makeSession(transport, opts) {
  if (transport === "sse") return new SseSession(opts);
  if (transport === "streamable") return new StreamableSession(opts);
  if (transport === "modern") return new ModernSession(opts);
  if (transport === "direct") return new DirectSession(opts);
  throw new Error(`unknown transport ${transport}`);
}

export { kindOf };
