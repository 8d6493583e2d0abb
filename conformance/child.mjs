#!/usr/bin/env node
// conformance/child.mjs: the MCP conformance suite's server fixture, as a LEGACY stdio server to put behind the
// proxy, so that `conformance server --url <proxy>/<name>/mcp` tests the proxy rather than an HTTP server.
//
// What it serves: the test_* tools, prompts, resources and completions that the scenarios of
// @modelcontextprotocol/conformance (https://github.com/modelcontextprotocol/conformance) call by name, with
// the behaviour its reference server examples/servers/typescript/everything-server.ts gives them, for both
// requirement sets: `--requirements 2025-11-25` (the legacy path: initialize, sessions, server→client
// requests) and `--requirements 2026-07-28` (sessionless requests and input_required results).
//
// Why legacy: it is built on @modelcontextprotocol/sdk 1.x only (low-level Server + StdioServerTransport) and
// knows nothing of 2026-07-28: no resultType, no ttlMs/cacheScope, no serverInfo in _meta, no server/discover,
// no input_required. Whatever a 2026-07-28 scenario needs beyond a 2025-11-25 server is the proxy's job:
//   - stamping resultType / ttlMs / cacheScope / _meta serverInfo, answering server/discover,
//   - mapping this child's -32002 "resource not found" to -32602 (data.uri is already set here),
//   - not forwarding this child's notifications/message unless the request set _meta logLevel,
//   - fanning out this child's */list_changed to subscriptions/listen streams,
//   - turning this child's elicitation/create, sampling/createMessage and roots/list requests (sent in the
//     middle of a tools/call or prompts/get, like any legacy server) into an input_required result, and
//     feeding the retry's inputResponses back to the child as the answers.
//
// Input-request keys. The scenarios name some keys (input-required-result-basic-elicitation asserts the key
// "user_name"; ignore-extra-params and validate-input send inputResponses under "user_name" on a fresh call).
// A legacy request has no key, only its JSON-RPC id, and the proxy keys the input requests it bridges by that
// id. So each child→client request below is sent with the key the reference server uses as its JSON-RPC id
// ("user_name", "greeting", "client_roots", …): ids may be strings (https://www.jsonrpc.org/specification#request_object).
// The SDK numbers its requests, so `KeyedRequestIds` sits between Server and StdioServerTransport and rewrites
// the id of each outgoing request to its key, and the id of each response back to the SDK's number. A key is
// unique while its request is outstanding: a second request under a key still in use gets "<key>.2", "<key>.3"…
// Once answered, a key is used again (the scenarios need "user_name" on every call), although MCP's base protocol
// says a request ID "MUST NOT have been previously used by the requestor within the same session"
// (https://modelcontextprotocol.io/specification/2025-11-25/basic#requests).
//
//   CONFORMANCE_CHILD_DEBUG=1   log every message in/out (as on the wire) on stderr.
//
// Run: node conformance/child.mjs   (stdio; normally spawned by the proxy, see proxy.test.ts section 8)

import { Server } from '@modelcontextprotocol/sdk/server/index.js';
import { StdioServerTransport } from '@modelcontextprotocol/sdk/server/stdio.js';
import {
  CallToolRequestSchema,
  CompleteRequestSchema,
  CreateMessageResultSchema,
  ElicitResultSchema,
  GetPromptRequestSchema,
  ListPromptsRequestSchema,
  ListResourceTemplatesRequestSchema,
  ListResourcesRequestSchema,
  ListRootsResultSchema,
  ListToolsRequestSchema,
  McpError,
  ReadResourceRequestSchema,
  SubscribeRequestSchema,
  UnsubscribeRequestSchema
} from '@modelcontextprotocol/sdk/types.js';

const DEBUG = process.env.CONFORMANCE_CHILD_DEBUG === '1';
const debug = (...args) => DEBUG && console.error('[conformance-child]', ...args);

// 1x1 red PNG and a minimal WAV, as in the conformance reference servers.
const TEST_IMAGE_BASE64 =
  'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==';
const TEST_AUDIO_BASE64 = 'UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA=';

const RESOURCE_NOT_FOUND = -32002; // the 2025 code; 2026-07-28 wants -32602 (the proxy maps it)
const INVALID_PARAMS = -32602;

const server = new Server(
  { name: 'conformance-legacy-child', version: '1.0.0' },
  {
    capabilities: {
      tools: { listChanged: true },
      resources: { subscribe: true, listChanged: true },
      prompts: { listChanged: true },
      logging: {},
      completions: {}
    },
    instructions: 'Legacy stdio fixture for the MCP conformance suite (served through a proxy).'
  }
);

// ───── helpers ─────

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const text = (t) => ({ type: 'text', text: t });
const emptySchema = { type: 'object', properties: {} };

/**
 * The key a child→client request is sent under, as its JSON-RPC id (see the header). Held in a symbol-keyed
 * property of its params: the SDK passes params through by reference or spread (both keep it) and
 * JSON.stringify drops symbol keys, so nothing of it reaches the wire.
 */
const INPUT_KEY = Symbol('input request key');
function keyed(key, params) {
  return { ...params, [INPUT_KEY]: key };
}

/** elicitation/create in the middle of the current request (the legacy push a proxy must turn into MRTR). */
function elicit(extra, key, message, properties, required) {
  return extra.sendRequest(
    {
      method: 'elicitation/create',
      params: keyed(key, { message, requestedSchema: { type: 'object', properties, required } })
    },
    ElicitResultSchema
  );
}

function sample(extra, key, prompt, maxTokens) {
  return extra.sendRequest(
    {
      method: 'sampling/createMessage',
      params: keyed(key, { messages: [{ role: 'user', content: text(prompt) }], maxTokens })
    },
    CreateMessageResultSchema
  );
}

function listRoots(extra, key) {
  return extra.sendRequest({ method: 'roots/list', params: keyed(key, {}) }, ListRootsResultSchema);
}

/** The accepted content's field, or undefined (declined, cancelled, or not a string). */
function accepted(result, field) {
  if (result?.action !== 'accept') return undefined;
  const value = result.content?.[field];
  return typeof value === 'string' || typeof value === 'boolean' ? value : undefined;
}

const sampledText = (r) => (r?.content?.type === 'text' ? r.content.text : JSON.stringify(r?.content ?? null));

// ───── tools ─────
// Order is stable, and test_simple_text comes first: http-header-validation calls tools[0] with {}.

const JSON_SCHEMA_2020_12_INPUT_SCHEMA = {
  $schema: 'https://json-schema.org/draft/2020-12/schema',
  type: 'object',
  $defs: {
    address: {
      $anchor: 'addressDef',
      type: 'object',
      properties: { street: { type: 'string' }, city: { type: 'string' } }
    }
  },
  properties: {
    name: { type: 'string' },
    address: { $ref: '#/$defs/address' },
    contactMethod: { type: 'string', enum: ['phone', 'email'] },
    phone: { type: 'string' },
    email: { type: 'string' }
  },
  allOf: [{ anyOf: [{ required: ['phone'] }, { required: ['email'] }] }],
  if: { properties: { contactMethod: { const: 'phone' } }, required: ['contactMethod'] },
  then: { required: ['phone'] },
  else: { required: ['email'] },
  additionalProperties: false
};

/** name → { description, inputSchema, run(args, extra) → CallToolResult } */
const tools = new Map();
function tool(name, description, run, inputSchema = emptySchema) {
  tools.set(name, { description, inputSchema, run });
}

tool('test_simple_text', 'Tests simple text content response', async () => ({
  content: [text('This is a simple text response for testing.')]
}));

tool('test_image_content', 'Tests image content response', async () => ({
  content: [{ type: 'image', data: TEST_IMAGE_BASE64, mimeType: 'image/png' }]
}));

tool('test_audio_content', 'Tests audio content response', async () => ({
  content: [{ type: 'audio', data: TEST_AUDIO_BASE64, mimeType: 'audio/wav' }]
}));

tool('test_embedded_resource', 'Tests embedded resource content response', async () => ({
  content: [
    {
      type: 'resource',
      resource: { uri: 'test://embedded-resource', mimeType: 'text/plain', text: 'This is an embedded resource content.' }
    }
  ]
}));

tool('test_multiple_content_types', 'Tests response with multiple content types (text, image, resource)', async () => ({
  content: [
    text('Multiple content types test:'),
    { type: 'image', data: TEST_IMAGE_BASE64, mimeType: 'image/png' },
    {
      type: 'resource',
      resource: {
        uri: 'test://mixed-content-resource',
        mimeType: 'application/json',
        text: JSON.stringify({ test: 'data', value: 123 })
      }
    }
  ]
}));

tool('test_tool_with_logging', 'Tests tool that emits log messages during execution', async (_args, extra) => {
  for (const [i, data] of ['Tool execution started', 'Tool processing data', 'Tool execution completed'].entries()) {
    if (i) await sleep(50);
    await extra.sendNotification({ method: 'notifications/message', params: { level: 'info', data } });
  }
  return { content: [text('Tool with logging executed successfully')] };
});

tool('test_tool_with_progress', 'Tests tool that reports progress notifications', async (_args, extra) => {
  const progressToken = extra._meta?.progressToken;
  for (const progress of [0, 50, 100]) {
    if (progress) await sleep(50);
    if (progressToken !== undefined) {
      await extra.sendNotification({
        method: 'notifications/progress',
        params: { progressToken, progress, total: 100, message: `Completed step ${progress} of 100` }
      });
    }
  }
  await sleep(10); // lets a client that handles notifications asynchronously see the last one before the result
  return { content: [text(String(progressToken ?? 'no progress token'))] };
});

tool('test_error_handling', 'Tests error response handling', async () => ({
  isError: true,
  content: [text('This tool intentionally returns an error for testing')]
}));

// Legacy (2025) server→client tools: tools-call-sampling / tools-call-elicitation on the legacy path.
tool(
  'test_sampling',
  'Tests server-initiated sampling (LLM completion request)',
  async (args, extra) => {
    const r = await sample(extra, 'sampling', String(args.prompt ?? ''), 100);
    return { content: [text(`LLM response: ${sampledText(r)}`)] };
  },
  { type: 'object', properties: { prompt: { type: 'string', description: 'The prompt to send to the LLM' } }, required: ['prompt'] }
);

tool(
  'test_elicitation',
  'Tests server-initiated elicitation (user input request)',
  async (args, extra) => {
    const r = await elicit(extra, 'elicitation', String(args.message ?? ''), { response: { type: 'string', description: "User's response" } }, ['response']);
    return { content: [text(`User response: action=${r.action}, content=${JSON.stringify(r.content ?? {})}`)] };
  },
  { type: 'object', properties: { message: { type: 'string', description: 'The message to show the user' } }, required: ['message'] }
);

tool('test_elicitation_sep1034_defaults', 'Tests elicitation with default values per SEP-1034', async (_args, extra) => {
  const r = await elicit(
    extra,
    'defaults',
    'Please review and update the form fields with defaults',
    {
      name: { type: 'string', description: 'User name', default: 'John Doe' },
      age: { type: 'integer', description: 'User age', default: 30 },
      score: { type: 'number', description: 'User score', default: 95.5 },
      status: { type: 'string', description: 'User status', enum: ['active', 'inactive', 'pending'], default: 'active' },
      verified: { type: 'boolean', description: 'Verification status', default: true }
    },
    []
  );
  return { content: [text(`Elicitation completed: action=${r.action}, content=${JSON.stringify(r.content ?? {})}`)] };
});

tool('test_elicitation_sep1330_enums', 'Tests elicitation with enum schema improvements per SEP-1330', async (_args, extra) => {
  const r = await elicit(
    extra,
    'enums',
    'Please select options from the enum fields',
    {
      untitledSingle: { type: 'string', description: 'Select one option', enum: ['option1', 'option2', 'option3'] },
      titledSingle: {
        type: 'string',
        description: 'Select one option with titles',
        oneOf: [
          { const: 'value1', title: 'First Option' },
          { const: 'value2', title: 'Second Option' },
          { const: 'value3', title: 'Third Option' }
        ]
      },
      legacyEnum: {
        type: 'string',
        description: 'Select one option (legacy)',
        enum: ['opt1', 'opt2', 'opt3'],
        enumNames: ['Option One', 'Option Two', 'Option Three']
      },
      untitledMulti: {
        type: 'array',
        description: 'Select multiple options',
        minItems: 1,
        maxItems: 3,
        items: { type: 'string', enum: ['option1', 'option2', 'option3'] }
      },
      titledMulti: {
        type: 'array',
        description: 'Select multiple options with titles',
        minItems: 1,
        maxItems: 3,
        items: {
          anyOf: [
            { const: 'value1', title: 'First Choice' },
            { const: 'value2', title: 'Second Choice' },
            { const: 'value3', title: 'Third Choice' }
          ]
        }
      }
    },
    []
  );
  return { content: [text(`Elicitation completed: action=${r.action}, content=${JSON.stringify(r.content ?? {})}`)] };
});

tool(
  'json_schema_2020_12_tool',
  'Tool with JSON Schema 2020-12 features for conformance testing (SEP-1613)',
  async (args) => ({ content: [text(`JSON Schema 2020-12 tool called with: ${JSON.stringify(args)}`)] }),
  JSON_SCHEMA_2020_12_INPUT_SCHEMA
);

// SEP-2243 custom header (unscored http-custom-header-server-validation): the proxy must check Mcp-Param-Region.
tool(
  'test_x_mcp_header',
  'Tests SEP-2243 Mcp-Param-* server-side validation',
  async (args) => ({ content: [text(`region=${args.region ?? '<none>'}`)] }),
  {
    type: 'object',
    properties: {
      region: { type: 'string', description: 'mirrored into Mcp-Param-Region', 'x-mcp-header': 'Region' },
      level: { type: 'integer', description: 'non-mirrored argument' }
    }
  }
);

// ── server-stateless diagnostics ──

// Needs sampling. server-stateless calls it with clientCapabilities {} and wants HTTP 400 -32021 with
// error.data.requiredCapabilities = { sampling: {} }. The sampling request is NOT caught: whatever error the
// proxy gives this request (it should be -32021 with that data) becomes this call's JSON-RPC error verbatim
// (code, message, data), which the proxy then answers with HTTP 400. Catching it and returning a result would
// make the scenario fail ("Server executed 'test_missing_capability' although ...").
tool('test_missing_capability', 'Requires the sampling client capability (drives the -32021 rejection)', async (_args, extra) => {
  const r = await sample(extra, 'llm_answer', 'Reply with the single word: pong', 16);
  return { content: [text(`sampling round-trip complete: ${sampledText(r)}`)] };
});

// Called with clientCapabilities { elicitation: {} } and read as a stream: must carry no top-level request.
tool('test_streaming_elicitation', 'Yields a response carrying no independent top-level JSON-RPC requests', async () => ({
  content: [text('stream observed: result frames only, no top-level requests')]
}));

// Logs unconditionally, as a legacy server does (it has no per-request log level). Called WITHOUT
// _meta logLevel: the proxy must not forward this notifications/message to the client.
tool('test_logging_tool', 'Emits a log message; the proxy forwards it only when the request set _meta logLevel', async (_args, extra) => {
  await extra.sendNotification({ method: 'notifications/message', params: { level: 'info', logger: 'conformance-child', data: 'test_logging_tool ran' } });
  return { content: [text('Logging evaluated')] };
});

// list_changed triggers, called while a subscriptions/listen stream is open (the proxy fans them out).
tool('test_trigger_tool_change', 'Sends notifications/tools/list_changed', async () => {
  await server.sendToolListChanged();
  return { content: [text('tools list_changed sent')] };
});
tool('test_trigger_prompt_change', 'Sends notifications/prompts/list_changed', async () => {
  await server.sendPromptListChanged();
  return { content: [text('prompts list_changed sent')] };
});
tool('test_trigger_resource_change', 'Sends notifications/resources/list_changed', async () => {
  await server.sendResourceListChanged();
  return { content: [text('resources list_changed sent')] };
});

// ── MRTR (input-required-result-*): legacy pushes the proxy must turn into input_required ──

// A1 (key "user_name" asserted), also A7 missing-input-response, A10 result-type, A14 ignore-extra-params,
// A15 validate-input.
tool('test_input_required_result_elicitation', 'Asks for the caller name via elicitation/create', async (_args, extra) => {
  const r = await elicit(extra, 'user_name', 'What is your name?', { name: { type: 'string' } }, ['name']);
  const name = accepted(r, 'name');
  return name === undefined
    ? { isError: true, content: [text(`No name given (action=${r.action})`)] }
    : { content: [text(`Hello, ${name}!`)] };
});

// A2: any key; round 2 sends a CreateMessageResult.
tool('test_input_required_result_sampling', 'Asks for an LLM completion via sampling/createMessage', async (_args, extra) => {
  const r = await sample(extra, 'capital_question', 'What is the capital of France?', 100);
  return { content: [text(`Sampling response: ${sampledText(r)}`)] };
});

// A3: the input request must be roots/list (so the proxy must bridge roots/list inside a call, not answer it).
tool('test_input_required_result_list_roots', 'Asks for the client roots via roots/list', async (_args, extra) => {
  const r = await listRoots(extra, 'client_roots');
  return { content: [text(`Client exposed ${r.roots.length} root(s): ${r.roots.map((x) => x.uri).join(', ')}`)] };
});

// A4: round 1 must carry inputRequests AND a string requestState (the proxy's); round 2 echoes it.
tool('test_input_required_result_request_state', 'Asks for a confirmation; the proxy round-trips requestState', async (_args, extra) => {
  const r = await elicit(extra, 'confirm', 'Please confirm', { ok: { type: 'boolean' } }, ['ok']);
  return accepted(r, 'ok') === true
    ? { content: [text('state-ok: requestState validated and confirmation received')] }
    : { isError: true, content: [text(`Not confirmed (action=${r.action})`)] };
});

// A5: all three kinds in ONE round (>= 3 inputRequests with elicitation/create, sampling/createMessage and
// roots/list) plus requestState. Sent concurrently, as a legacy server can; the proxy must gather them into
// a single input_required.
tool('test_input_required_result_multiple_inputs', 'Asks for elicitation, sampling and roots input at once', async (_args, extra) => {
  const [who, greeting, roots] = await Promise.all([
    elicit(extra, 'user_name', 'What is your name?', { name: { type: 'string' } }, ['name']),
    sample(extra, 'greeting', 'Generate a greeting', 50),
    listRoots(extra, 'client_roots')
  ]);
  return { content: [text(`Name: ${accepted(who, 'name')}; Greeting: ${sampledText(greeting)}; Roots: ${roots.roots.length}`)] };
});

// A6: two sequential elicitations = two input_required rounds with DIFFERENT requestState, then complete.
tool('test_input_required_result_multi_round', 'Two elicitation rounds before completing', async (_args, extra) => {
  const r1 = await elicit(extra, 'step1', 'Step 1: What is your name?', { name: { type: 'string' } }, ['name']);
  const r2 = await elicit(extra, 'step2', 'Step 2: What is your favorite color?', { color: { type: 'string' } }, ['color']);
  return { content: [text(`Multi-round complete for ${accepted(r1, 'name')} who likes ${accepted(r2, 'color')}`)] };
});

// A12: round 1 must carry requestState; the retry carries requestState + "-TAMPERED" and must get a
// JSON-RPC error (the proxy's HMAC check; this child never sees the state).
tool('test_input_required_result_tampered_state', 'Asks for a confirmation; the proxy must reject tampered requestState', async (_args, extra) => {
  const r = await elicit(extra, 'confirm', 'Please confirm', { ok: { type: 'boolean' } }, ['ok']);
  return { content: [text(`integrity-ok: confirmation=${accepted(r, 'ok')}`)] };
});

// A13: called with clientCapabilities { sampling: {} } only. This child believes the client supports all
// three (the proxy declared them at initialize), so it asks for all three at once and tolerates refusals:
// a proxy that answers the undeclared ones with an error on the child's request (and keeps the call) yields
// input_required with only "greeting" -> pass. A proxy that instead fails the whole call with -32021, or that
// forwards the elicitation, fails the scenario.
tool('test_input_required_result_capabilities', 'Asks for each input kind; only the declared ones should reach the client', async (_args, extra) => {
  const caps = server.getClientCapabilities() ?? {};
  const asks = [];
  if (caps.elicitation) asks.push(['user_name', elicit(extra, 'user_name', 'What is your name?', { name: { type: 'string' } }, ['name'])]);
  if (caps.sampling) asks.push(['greeting', sample(extra, 'greeting', 'Generate a short greeting', 50)]);
  if (caps.roots) asks.push(['client_roots', listRoots(extra, 'client_roots')]);
  const settled = await Promise.allSettled(asks.map(([, p]) => p));
  const got = asks.flatMap(([k], i) => (settled[i].status === 'fulfilled' ? [k] : []));
  const refused = asks.flatMap(([k], i) => (settled[i].status === 'rejected' ? [`${k} (${settled[i].reason?.code ?? '?'})`] : []));
  return { content: [text(`capabilities-ok: received ${got.join(',') || 'nothing'}; refused ${refused.join(',') || 'nothing'}`)] };
});

// ───── resources ─────

const resources = [
  { uri: 'test://static-text', name: 'static-text', title: 'Static Text Resource', description: 'A static text resource for testing', mimeType: 'text/plain' },
  { uri: 'test://static-binary', name: 'static-binary', title: 'Static Binary Resource', description: 'A static binary resource (image) for testing', mimeType: 'image/png' },
  { uri: 'test://watched-resource', name: 'watched-resource', title: 'Watched Resource', description: 'A subscribable resource; updated every 3 s while subscribed', mimeType: 'text/plain' }
];
const TEMPLATE = /^test:\/\/template\/([^/]+)\/data$/;
let watchedVersion = 0;
const subscriptions = new Set();
let watchTimer = null;

function readResource(uri) {
  switch (uri) {
    case 'test://static-text':
      return [{ uri, mimeType: 'text/plain', text: 'This is the content of the static text resource.' }];
    case 'test://static-binary':
      return [{ uri, mimeType: 'image/png', blob: TEST_IMAGE_BASE64 }];
    case 'test://watched-resource':
      return [{ uri, mimeType: 'text/plain', text: `Watched resource content (version ${watchedVersion})` }];
  }
  const m = TEMPLATE.exec(uri);
  if (m) {
    const id = decodeURIComponent(m[1]);
    return [{ uri, mimeType: 'application/json', text: JSON.stringify({ id, templateTest: true, data: `Data for ID: ${id}` }) }];
  }
  // 2025-era "resource not found": -32002 with the uri. The proxy answers 2026 clients with -32602.
  throw new McpError(RESOURCE_NOT_FOUND, `Resource not found: ${uri}`, { uri });
}

server.setRequestHandler(ListResourcesRequestSchema, async () => ({ resources }));
server.setRequestHandler(ListResourceTemplatesRequestSchema, async () => ({
  resourceTemplates: [
    {
      uriTemplate: 'test://template/{id}/data',
      name: 'template',
      title: 'Resource Template',
      description: 'A resource template with parameter substitution',
      mimeType: 'application/json'
    }
  ]
}));
server.setRequestHandler(ReadResourceRequestSchema, async (request) => ({ contents: readResource(request.params.uri) }));
server.setRequestHandler(SubscribeRequestSchema, async (request) => {
  subscriptions.add(request.params.uri);
  if (!watchTimer && subscriptions.has('test://watched-resource')) {
    watchTimer = setInterval(() => {
      watchedVersion++;
      server.sendResourceUpdated({ uri: 'test://watched-resource' }).catch(() => {});
    }, 3000);
    watchTimer.unref();
  }
  return {};
});
server.setRequestHandler(UnsubscribeRequestSchema, async (request) => {
  subscriptions.delete(request.params.uri);
  if (watchTimer && !subscriptions.has('test://watched-resource')) {
    clearInterval(watchTimer);
    watchTimer = null;
  }
  return {};
});

// ───── prompts ─────

const prompts = [
  { name: 'test_simple_prompt', title: 'Simple Test Prompt', description: 'A simple prompt without arguments' },
  {
    name: 'test_prompt_with_arguments',
    title: 'Prompt With Arguments',
    description: 'A prompt with required arguments',
    arguments: [
      { name: 'arg1', description: 'First test argument', required: true },
      { name: 'arg2', description: 'Second test argument', required: true }
    ]
  },
  {
    name: 'test_prompt_with_embedded_resource',
    title: 'Prompt With Embedded Resource',
    description: 'A prompt that includes an embedded resource',
    arguments: [{ name: 'resourceUri', description: 'URI of the resource to embed', required: true }]
  },
  { name: 'test_prompt_with_image', title: 'Prompt With Image', description: 'A prompt that includes image content' },
  { name: 'test_input_required_result_prompt', title: 'MRTR Prompt', description: 'Asks for context via elicitation before rendering' }
];

server.setRequestHandler(ListPromptsRequestSchema, async () => ({ prompts }));
server.setRequestHandler(GetPromptRequestSchema, async (request, extra) => {
  const { name } = request.params;
  const args = request.params.arguments ?? {};
  const need = (key) => {
    if (typeof args[key] !== 'string') throw new McpError(INVALID_PARAMS, `Missing required argument: ${key}`);
    return args[key];
  };
  switch (name) {
    case 'test_simple_prompt':
      return { messages: [{ role: 'user', content: text('This is a simple prompt for testing.') }] };
    case 'test_prompt_with_arguments':
      return { messages: [{ role: 'user', content: text(`Prompt with arguments: arg1='${need('arg1')}', arg2='${need('arg2')}'`) }] };
    case 'test_prompt_with_embedded_resource':
      return {
        messages: [
          { role: 'user', content: { type: 'resource', resource: { uri: need('resourceUri'), mimeType: 'text/plain', text: 'Embedded resource content for testing.' } } },
          { role: 'user', content: text('Please process the embedded resource above.') }
        ]
      };
    case 'test_prompt_with_image':
      return {
        messages: [
          { role: 'user', content: { type: 'image', data: TEST_IMAGE_BASE64, mimeType: 'image/png' } },
          { role: 'user', content: text('Please analyze the image above.') }
        ]
      };
    case 'test_input_required_result_prompt': {
      // A9: prompts/get is also an MRTR method. Key "user_context"; round 2 must be a GetPromptResult.
      const r = await elicit(extra, 'user_context', 'What context should the prompt use?', { context: { type: 'string' } }, ['context']);
      return { messages: [{ role: 'user', content: text(`Prompt with context: ${accepted(r, 'context') ?? '(none)'}`) }] };
    }
  }
  throw new McpError(INVALID_PARAMS, `Prompt not found: ${name}`);
});

// ───── completion ─────

const COMPLETIONS = {
  arg1: ['paris', 'park', 'party', 'test-value-1', 'test-value-2'],
  arg2: ['alpha', 'beta', 'gamma'],
  resourceUri: ['test://static-text', 'test://static-binary', 'test://template/123/data'],
  id: ['1', '42', '123']
};
server.setRequestHandler(CompleteRequestSchema, async (request) => {
  const { name, value } = request.params.argument;
  const values = (COMPLETIONS[name] ?? []).filter((v) => v.startsWith(value ?? ''));
  return { completion: { values, total: values.length, hasMore: false } };
});

// ───── tools/list, tools/call ─────

server.setRequestHandler(ListToolsRequestSchema, async () => ({
  tools: [...tools].map(([name, t]) => ({ name, description: t.description, inputSchema: t.inputSchema }))
}));

server.setRequestHandler(CallToolRequestSchema, async (request, extra) => {
  const { name, arguments: args = {} } = request.params;
  const t = tools.get(name);
  if (!t) throw new McpError(INVALID_PARAMS, `Tool not found: ${name}`);
  // Errors thrown here (including an error the client gave a sampling/elicitation/roots request) become the
  // JSON-RPC error of this tools/call, code/message/data intact. Only test_error_handling returns isError.
  return t.run(args, extra);
});

// ───── keyed request ids ─────

/**
 * A Transport in front of another (the SDK's Transport interface: start, send, close, onmessage, onclose,
 * onerror). Outgoing, a request carrying INPUT_KEY goes out with its key as its id, and a cancellation of it
 * (the SDK's timeout) names that key; incoming, a response to a key gets the SDK's numeric id back.
 */
class KeyedRequestIds {
  /** wire key → the SDK's id, and the SDK's id → wire key, for requests not yet answered or cancelled. */
  #sdkIdOf = new Map();
  #keyOf = new Map();

  constructor(inner) {
    this.inner = inner;
    inner.onmessage = (message, extra) => {
      debug('in ', JSON.stringify(message).slice(0, 400));
      this.onmessage?.(this.#incoming(message), extra);
    };
    inner.onclose = () => this.onclose?.();
    inner.onerror = (error) => this.onerror?.(error);
  }

  start() {
    return this.inner.start();
  }

  close() {
    return this.inner.close();
  }

  send(message, options) {
    const wire = this.#outgoing(message);
    debug('out', JSON.stringify(wire).slice(0, 400));
    return this.inner.send(wire, options);
  }

  #outgoing(message) {
    if (message.method === 'notifications/cancelled' && this.#keyOf.has(message.params?.requestId)) {
      const key = this.#forget(message.params.requestId);
      return { ...message, params: { ...message.params, requestId: key } };
    }
    const base = message.method !== undefined && message.id !== undefined ? message.params?.[INPUT_KEY] : undefined;
    if (base === undefined) return message;
    let key = base;
    for (let n = 2; this.#sdkIdOf.has(key); n++) key = `${base}.${n}`;
    this.#sdkIdOf.set(key, message.id);
    this.#keyOf.set(message.id, key);
    return { ...message, id: key };
  }

  #incoming(message) {
    const isResponse = message.method === undefined && ('result' in message || 'error' in message);
    if (!isResponse || !this.#sdkIdOf.has(message.id)) return message;
    const sdkId = this.#sdkIdOf.get(message.id);
    this.#forget(sdkId);
    return { ...message, id: sdkId };
  }

  /** Drops a request's mapping; returns its wire key. */
  #forget(sdkId) {
    const key = this.#keyOf.get(sdkId);
    this.#keyOf.delete(sdkId);
    this.#sdkIdOf.delete(key);
    return key;
  }
}

// ───── run ─────

await server.connect(new KeyedRequestIds(new StdioServerTransport()));
debug('ready');
