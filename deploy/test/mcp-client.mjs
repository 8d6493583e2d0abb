// Real MCP calls through the proxy with the official SDK client, for deploy/test-image.sh and
// deploy/test-sharding.sh.  Usage: node deploy/test/mcp-client.mjs SCENARIO BASE_URL
// (the bearer token, if any, from MCP_TOKEN). Prints one line per check; exits non-zero on the first failure.
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { SSEClientTransport } from '@modelcontextprotocol/sdk/client/sse.js';

const [scenario, base] = process.argv.slice(2);
const token = process.env.MCP_TOKEN || '';
const headers = token ? { Authorization: `Bearer ${token}` } : {};
const deadline = setTimeout(() => { console.error(`mcp-client: ${scenario} timed out`); process.exit(1); }, 60_000);

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`  ok  ${what}`);
}

async function connect(path, kind = 'mcp') {
  const url = new URL(path, base);
  const transport = kind === 'sse'
    ? new SSEClientTransport(url, { requestInit: { headers } })
    : new StreamableHTTPClientTransport(url, { requestInit: { headers } });
  const client = new Client({ name: `deploy-test-${scenario}`, version: '1.0.0' });
  await client.connect(transport);
  return { client, transport };
}

const text = (result) => result.content.filter((c) => c.type === 'text').map((c) => c.text).join('\n');

const scenarios = {
  /** server-memory: write an entity, read it back, over Streamable HTTP and legacy SSE. */
  async memory() {
    const name = `deploy-test-${process.pid}-${Date.now()}`;
    const { client, transport } = await connect('/memory/mcp');
    check(transport.sessionId, `/memory/mcp initialize gave an Mcp-Session-Id (${client.getServerVersion()?.name})`);
    const tools = (await client.listTools()).tools.map((t) => t.name);
    check(tools.includes('create_entities') && tools.includes('search_nodes'), `/memory/mcp tools/list: ${tools.length} tools`);
    await client.callTool({ name: 'create_entities', arguments: { entities: [{ name, entityType: 'test', observations: ['made by the deploy test'] }] } });
    const found = text(await client.callTool({ name: 'search_nodes', arguments: { query: name } }));
    check(found.includes(name), '/memory/mcp create_entities then search_nodes finds the entity');
    await transport.terminateSession();
    await client.close();
    const sse = await connect('/memory/sse', 'sse');
    const again = text(await sse.client.callTool({ name: 'open_nodes', arguments: { names: [name] } }));
    check(again.includes('made by the deploy test'), '/memory/sse (legacy SSE) open_nodes reads the same entity');
    await sse.client.close();
    console.log(JSON.stringify({ entity: name }));
  },
  /** server-everything: echo. */
  async everything() {
    const { client, transport } = await connect('/everything/mcp');
    check(transport.sessionId, `/everything/mcp initialize gave an Mcp-Session-Id (${client.getServerVersion()?.name})`);
    const tools = (await client.listTools()).tools.map((t) => t.name);
    check(tools.includes('echo'), `/everything/mcp tools/list: ${tools.length} tools`);
    const echoed = text(await client.callTool({ name: 'echo', arguments: { message: 'routed by path' } }));
    check(echoed.includes('routed by path'), `/everything/mcp echo answered "${echoed}"`);
    await transport.terminateSession();
    await client.close();
  },
  /** deploy/test/orphaner.mjs (per-session): start grandchildren, then end the session so the proxy stops the child. */
  async orphan() {
    const { client, transport } = await connect('/orphaner/mcp');
    const started = JSON.parse(text(await client.callTool({ name: 'orphan', arguments: {} })));
    check(started.grandchildren.length === 3, `/orphaner/mcp child ${started.pid} started grandchildren ${started.grandchildren.join(', ')}`);
    await transport.terminateSession(); // DELETE: the proxy stops this session's child
    await client.close();
    console.log(JSON.stringify(started));
  },
  /** Without the bearer token: 401 from the proxy (the SDK surfaces it as an error). */
  async unauthorized() {
    const res = await fetch(new URL('/memory/mcp', base), {
      method: 'POST', headers: { 'Content-Type': 'application/json', Accept: 'application/json, text/event-stream' },
      body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'initialize', params: { protocolVersion: '2025-06-18', capabilities: {}, clientInfo: { name: 'x', version: '1' } } }),
    });
    check(res.status === 401, `POST /memory/mcp without a token answers ${res.status}`);
  },
};

try {
  if (!scenarios[scenario] || !base) throw new Error(`usage: mcp-client.mjs ${Object.keys(scenarios).join('|')} BASE_URL`);
  await scenarios[scenario]();
  clearTimeout(deadline);
} catch (err) {
  console.error(`mcp-client ${scenario}: ${err?.stack ?? err}`);
  process.exit(1);
}
