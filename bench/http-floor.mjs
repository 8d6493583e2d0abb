#!/usr/bin/env node
// HTTP-only floor: a bare node:http server that answers MCP `initialize` and
// `tools/call echo` in-process, on both transports, at the same paths as the
// proxy's `echo` server, with no child process behind it. It is what one HTTP
// hop costs on this machine; the direct stdio floor is what one pipe hop costs;
// a proxy is one of each.
//
//   node bench/http-floor.mjs --port N          (binds 127.0.0.1 only)
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
import { randomBytes } from "node:crypto";

const argv = process.argv.slice(2);
const port = Number(argv[argv.indexOf("--port") + 1]);
if (!(port > 0 && port < 65536)) {
  console.error("usage: http-floor.mjs --port N");
  process.exit(2);
}

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
  if (path === "/readyz" || path === "/healthz") return res.writeHead(200).end("ok");
  res.writeHead(404).end();
});
server.listen(port, "127.0.0.1");
for (const sig of ["SIGTERM", "SIGINT", "SIGHUP"]) process.on(sig, () => process.exit(0));
