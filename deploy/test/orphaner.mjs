// A minimal stdio MCP server (no dependencies: it runs in the distroless image) whose tool `orphan` starts
// grandchildren and returns their pids. When the proxy stops this child (its session ends: stdin closes), it
// exits at once and leaves them orphaned: two in its process group (the proxy's group SIGTERM reaches them)
// and one in a session of its own (setsid: out of the proxy's reach; it exits by itself after a while).
// Whoever is PID 1 inherits them; unless PID 1 reaps, each one that exits stays a zombie.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';

const LIVE_MS = Number(process.env.ORPHAN_LIVE_MS || 1500);
const send = (msg) => process.stdout.write(JSON.stringify(msg) + '\n');

function orphan() {
  const sleeper = `setTimeout(() => {}, ${LIVE_MS})`;
  const pids = [];
  for (const detached of [false, false, true]) {
    const child = spawn(process.execPath, ['-e', sleeper], { stdio: 'ignore', detached });
    child.unref();
    pids.push(child.pid);
  }
  return pids;
}

const rl = createInterface({ input: process.stdin });
rl.on('line', (line) => {
  let msg;
  try { msg = JSON.parse(line); } catch { return; }
  if (msg.id === undefined || !msg.method) return; // notifications, responses
  const { id, method, params } = msg;
  if (method === 'initialize') {
    return send({ jsonrpc: '2.0', id, result: {
      protocolVersion: params?.protocolVersion ?? '2025-06-18',
      capabilities: { tools: {} }, serverInfo: { name: 'orphaner', version: '1.0.0' },
    } });
  }
  if (method === 'ping') return send({ jsonrpc: '2.0', id, result: {} });
  if (method === 'tools/list') {
    return send({ jsonrpc: '2.0', id, result: { tools: [{
      name: 'orphan', description: 'start 3 grandchildren that outlive this process',
      inputSchema: { type: 'object', properties: {} },
    }] } });
  }
  if (method === 'tools/call' && params?.name === 'orphan') {
    const pids = orphan();
    return send({ jsonrpc: '2.0', id, result: { content: [{ type: 'text', text: JSON.stringify({ pid: process.pid, grandchildren: pids }) }] } });
  }
  send({ jsonrpc: '2.0', id, error: { code: -32601, message: 'Method not found' } });
});
// Stopped by the proxy: stdin closes. Exit at once, leaving the grandchildren behind.
rl.on('close', () => process.exit(0));
