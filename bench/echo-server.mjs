// Adapted from ../shared/bench/echo-server.mjs (our project's benchmark harness); unchanged but for this header.
// Minimal stdio MCP server for benchmarking proxies. No dependencies.
//
// Newline-delimited JSON-RPC 2.0 on stdin/stdout. Implements just enough of MCP
// for a proxy to front it and a client to call one tool:
//   initialize            -> echoes the client's protocolVersion, capabilities {tools:{}}
//   notifications/*       -> ignored
//   ping                  -> {}
//   tools/list            -> one tool, `echo`
//   tools/call echo       -> content [{type:"text", text}] where text is the `text`
//                            argument, right-padded with '.' to `size` bytes when
//                            `size` is given and larger than the text
//   anything else with id -> JSON-RPC error -32601
// Exits when stdin closes. Work per call is a string concat, so what a benchmark
// measures through a proxy is the proxy, not this server.

import { Buffer } from "node:buffer";

const SERVER_INFO = { name: "bench-echo", version: "1.0.0" };
const DEFAULT_PROTOCOL = "2025-06-18";
const ECHO_TOOL = {
  name: "echo",
  description: "Returns `text`, right-padded with '.' to `size` bytes if given.",
  inputSchema: {
    type: "object",
    properties: {
      text: { type: "string" },
      size: { type: "integer", minimum: 0 },
    },
    required: ["text"],
  },
};

const padCache = new Map();
function pad(n) {
  let s = padCache.get(n);
  if (s === undefined) {
    s = ".".repeat(n);
    if (padCache.size < 64) padCache.set(n, s);
  }
  return s;
}

// Batch writes issued in the same tick into one write() to keep syscalls low.
let outQueue = [];
let flushScheduled = false;
function send(msg) {
  outQueue.push(JSON.stringify(msg));
  if (!flushScheduled) {
    flushScheduled = true;
    setImmediate(flush);
  }
}
function flush() {
  flushScheduled = false;
  if (outQueue.length === 0) return;
  const data = outQueue.join("\n") + "\n";
  outQueue = [];
  process.stdout.write(data);
}

function handle(msg) {
  if (msg === null || typeof msg !== "object") return;
  if (Array.isArray(msg)) {
    for (const m of msg) handle(m);
    return;
  }
  const { id, method, params } = msg;
  if (method === undefined) return; // a response to something we never sent
  if (id === undefined || id === null) return; // notification
  switch (method) {
    case "initialize":
      return send({
        jsonrpc: "2.0",
        id,
        result: {
          protocolVersion: params?.protocolVersion ?? DEFAULT_PROTOCOL,
          capabilities: { tools: {} },
          serverInfo: SERVER_INFO,
        },
      });
    case "ping":
      return send({ jsonrpc: "2.0", id, result: {} });
    case "tools/list":
      return send({ jsonrpc: "2.0", id, result: { tools: [ECHO_TOOL] } });
    case "tools/call": {
      const name = params?.name;
      const args = params?.arguments ?? {};
      if (name !== "echo") {
        return send({
          jsonrpc: "2.0",
          id,
          error: { code: -32602, message: `Unknown tool: ${name}` },
        });
      }
      let text = typeof args.text === "string" ? args.text : String(args.text ?? "");
      const size = Number.isInteger(args.size) ? args.size : 0;
      if (size > 0) {
        const have = Buffer.byteLength(text, "utf8");
        if (size > have) text += pad(size - have);
      }
      return send({
        jsonrpc: "2.0",
        id,
        result: { content: [{ type: "text", text }], isError: false },
      });
    }
    default:
      return send({
        jsonrpc: "2.0",
        id,
        error: { code: -32601, message: `Method not found: ${method}` },
      });
  }
}

let buf = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  buf += chunk;
  let start = 0;
  let nl;
  while ((nl = buf.indexOf("\n", start)) !== -1) {
    let line = buf.slice(start, nl);
    start = nl + 1;
    if (line.endsWith("\r")) line = line.slice(0, -1);
    if (!line.trim()) continue;
    let msg;
    try {
      msg = JSON.parse(line);
    } catch {
      send({ jsonrpc: "2.0", id: null, error: { code: -32700, message: "Parse error" } });
      continue;
    }
    handle(msg);
  }
  if (start > 0) buf = buf.slice(start);
});
// Exit once stdin closes and pending output is written (no explicit exit, so a
// pipe write still in flight is not cut off).
process.stdin.on("end", () => flush());
process.stdout.on("error", () => process.exit(0));
for (const sig of ["SIGTERM", "SIGINT", "SIGHUP"]) process.on(sig, () => process.exit(0));
