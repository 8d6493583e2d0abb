#!/usr/bin/env node
// HTTP-only floor: a bare node:http server that answers MCP `initialize` and
// `tools/call echo` in-process, on both transports, at the same paths as the
// proxy's `echo` server, with no child process behind it. It is what one HTTP
// hop costs on this machine; the direct stdio floor is what one pipe hop costs;
// a proxy is one of each.
//
//   node bench/http-floor.mjs --port N          (binds 127.0.0.1 only)
//   node bench/http-floor.mjs --port N --relay bench/echo-server.mjs
//
// With --relay it is the leanest two-hop relay instead: every request other
// than initialize goes to one echo child over its pipe, its id swapped for a
// counter, one pipe write per message, no batching, no checks, no limits; the
// child's answer is routed by an id read off the line's prefix (no JSON.parse)
// and sent back with the client's id spliced in. One HTTP hop plus one pipe hop
// and nothing else: what a proxy costs here before any proxy logic.
//
//   GET  /readyz                     200
//   POST /echo/mcp                   Streamable HTTP: initialize -> JSON + Mcp-Session-Id;
//                                    notifications -> 202; requests -> JSON (session checked)
//   GET  /echo/mcp                   standalone SSE stream of a session (held, idle)
//   DELETE /echo/mcp                 ends a session
//   GET  /echo/sse                   legacy SSE stream; first event `endpoint`
//   POST /echo/messages?sessionId=   202, response written to that session's stream
//
// The echo semantics are those of echo-server.mjs (text right-padded with '.'
// to `size` bytes). Deliberately lean: parse each body once, stringify each
// answer once, write it with one call. No dependencies.
import http from "node:http";
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";

const argv = process.argv.slice(2);
const port = Number(argv[argv.indexOf("--port") + 1]);
if (!(port > 0 && port < 65536)) {
  console.error("usage: http-floor.mjs --port N");
  process.exit(2);
}

const relayAt = argv.indexOf("--relay");
const RELAY_CHILD = relayAt === -1 ? null : argv[relayAt + 1];
const SERVER_INFO = { name: "bench-http-floor", version: "1.0.0" };
const MAX_BODY = 4 * 1024 * 1024;
const MAX_SESSIONS = 50_000;

const padCache = new Map();
function pad(n) {
  let s = padCache.get(n);
  if (s === undefined) {
    s = ".".repeat(n);
    if (padCache.size < 64) padCache.set(n, s);
  }
  return s;
}

/** The JSON-RPC answer to one request, or null for a notification/response. */
function answer(msg) {
  if (msg === null || typeof msg !== "object" || msg.method === undefined) return null;
  const { id, method, params } = msg;
  if (id === undefined || id === null) return null;
  if (method === "initialize") {
    return { jsonrpc: "2.0", id, result: { protocolVersion: params?.protocolVersion ?? "2025-06-18", capabilities: { tools: {} }, serverInfo: SERVER_INFO } };
  }
  if (method === "ping") return { jsonrpc: "2.0", id, result: {} };
  if (method === "tools/call" && params?.name === "echo") {
    const args = params.arguments ?? {};
    let text = typeof args.text === "string" ? args.text : String(args.text ?? "");
    const size = Number.isInteger(args.size) ? args.size : 0;
    if (size > 0) {
      const have = Buffer.byteLength(text, "utf8");
      if (size > have) text += pad(size - have);
    }
    return { jsonrpc: "2.0", id, result: { content: [{ type: "text", text }], isError: false } };
  }
  return { jsonrpc: "2.0", id, error: { code: -32601, message: "Method not found" } };
}

// ------------------------------------------------------------ --relay mode
const waiting = new Map(); // child id -> (line with the client's id spliced in) => void
let nextChildId = 1;
let relayReady = RELAY_CHILD === null;
let child = null;
const ANSWER_PREFIX = /^\{"jsonrpc":"2\.0","id":(\d+),/;

if (RELAY_CHILD !== null) {
  child = spawn(process.execPath, [RELAY_CHILD], { stdio: ["pipe", "pipe", "inherit"] });
  child.on("exit", () => process.exit(1));
  child.stdout.setEncoding("utf8");
  let partial = "";
  child.stdout.on("data", (text) => {
    let start = 0;
    for (let nl = text.indexOf("\n"); nl !== -1; nl = text.indexOf("\n", start)) {
      const line = partial + text.slice(start, nl);
      partial = "";
      start = nl + 1;
      const m = ANSWER_PREFIX.exec(line);
      const done = m && waiting.get(Number(m[1]));
      if (!done) continue;
      waiting.delete(Number(m[1]));
      done(line.slice(m[0].length));
    }
    partial += text.slice(start);
  });
  waiting.set(0, () => {
    child.stdin.write('{"jsonrpc":"2.0","method":"notifications/initialized"}\n');
    relayReady = true;
  });
  child.stdin.write(JSON.stringify({ jsonrpc: "2.0", id: 0, method: "initialize", params: { protocolVersion: "2025-06-18", capabilities: {}, clientInfo: { name: "relay", version: "1.0.0" } } }) + "\n");
}

/** Sends a request to the child; `done` gets its answer as JSON text carrying the client's id. */
function relay(msg, done) {
  const clientId = JSON.stringify(msg.id);
  const id = nextChildId++;
  waiting.set(id, (rest) => done(`{"jsonrpc":"2.0","id":${clientId},${rest}`));
  msg.id = id;
  child.stdin.write(JSON.stringify(msg) + "\n");
}

/** Whether a message goes to the child in --relay mode (requests other than initialize and ping). */
const relayed = (msg) => child !== null && msg?.id != null && typeof msg.method === "string" && msg.method !== "initialize" && msg.method !== "ping";

function readBody(req, res, cb) {
  const chunks = [];
  let size = 0;
  req.on("data", (c) => {
    size += c.length;
    if (size > MAX_BODY) {
      res.writeHead(413).end();
      req.destroy();
      return;
    }
    chunks.push(c);
  });
  req.on("end", () => {
    let msg;
    try {
      msg = JSON.parse(chunks.length === 1 ? chunks[0].toString("utf8") : Buffer.concat(chunks).toString("utf8"));
    } catch {
      res.writeHead(400, { "Content-Type": "application/json" }).end('{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}');
      return;
    }
    cb(msg);
  });
}

const newId = () => randomBytes(16).toString("base64url");
const streamSessions = new Map(); // Streamable session id -> GET stream response or null
const sseSessions = new Map(); // SSE session id -> stream response
const SSE_HEADERS = { "Content-Type": "text/event-stream", "Cache-Control": "no-cache", Connection: "keep-alive" };

function streamable(req, res) {
  const sid = req.headers["mcp-session-id"];
  if (req.method === "POST") {
    readBody(req, res, (msg) => {
      if (msg?.method === "initialize") {
        if (streamSessions.size >= MAX_SESSIONS) return res.writeHead(503).end();
        const id = newId();
        streamSessions.set(id, null);
        const body = JSON.stringify(answer(msg));
        res.writeHead(200, { "Content-Type": "application/json", "Mcp-Session-Id": id, "Content-Length": Buffer.byteLength(body) }).end(body);
        return;
      }
      if (sid === undefined) return res.writeHead(400).end();
      if (!streamSessions.has(sid)) return res.writeHead(404).end();
      if (relayed(msg)) {
        return relay(msg, (body) => res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) }).end(body));
      }
      const out = answer(msg);
      if (out === null) return res.writeHead(202).end();
      const body = JSON.stringify(out);
      res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) }).end(body);
    });
    return;
  }
  if (sid === undefined || !streamSessions.has(sid)) return res.writeHead(sid === undefined ? 400 : 404).end();
  if (req.method === "GET") {
    if (streamSessions.get(sid)) return res.writeHead(409).end();
    res.writeHead(200, SSE_HEADERS);
    res.flushHeaders();
    streamSessions.set(sid, res);
    res.on("close", () => {
      if (streamSessions.get(sid) === res) streamSessions.set(sid, null);
    });
    return;
  }
  if (req.method === "DELETE") {
    streamSessions.get(sid)?.end();
    streamSessions.delete(sid);
    return res.writeHead(200).end();
  }
  res.writeHead(405).end();
}

function sseOpen(req, res) {
  if (sseSessions.size >= MAX_SESSIONS) return res.writeHead(503).end();
  const id = newId();
  res.writeHead(200, SSE_HEADERS);
  res.write(`event: endpoint\ndata: /echo/messages?sessionId=${id}\n\n`);
  sseSessions.set(id, res);
  res.on("close", () => sseSessions.delete(id));
}

function ssePost(req, res, query) {
  const m = /(?:^|&)sessionId=([^&]*)/.exec(query);
  const stream = m ? sseSessions.get(m[1]) : undefined;
  if (!stream) {
    req.resume();
    return res.writeHead(404).end();
  }
  readBody(req, res, (msg) => {
    if (relayed(msg)) {
      relay(msg, (body) => stream.write(`event: message\ndata: ${body}\n\n`));
      return res.writeHead(202).end("Accepted");
    }
    res.writeHead(202).end("Accepted");
    const out = answer(msg);
    if (out !== null) stream.write(`event: message\ndata: ${JSON.stringify(out)}\n\n`);
  });
}

const server = http.createServer((req, res) => {
  const url = req.url ?? "/";
  const q = url.indexOf("?");
  const path = q === -1 ? url : url.slice(0, q);
  if (path === "/echo/mcp") return streamable(req, res);
  if (path === "/echo/messages" && req.method === "POST") return ssePost(req, res, q === -1 ? "" : url.slice(q + 1));
  if (path === "/echo/sse" && req.method === "GET") return sseOpen(req, res);
  if (path === "/readyz" || path === "/healthz") return res.writeHead(relayReady ? 200 : 503).end();
  res.writeHead(404).end();
});
server.listen(port, "127.0.0.1");
for (const sig of ["SIGTERM", "SIGINT", "SIGHUP"]) process.on(sig, () => process.exit(0));
