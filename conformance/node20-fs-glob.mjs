// node20-fs-glob.mjs: lets the MCP conformance CLI (@modelcontextprotocol/conformance 0.2.0-alpha.x) run on Node 20.
//
// Why: the CLI's bundled dist/index.js starts with `import { …, globSync, … } from "fs"`. fs.globSync was
// added in Node 22.0.0 (https://nodejs.org/api/fs.html#fsglobsyncpattern-options), so on Node 20 the import
// fails at link time ("The requested module 'fs' does not provide an export named 'globSync'") and no command
// runs, although the CLI declares Node 20 as its build target (tsdown --target node20). Its only use of
// globSync is `globSync("**/checks.json", { cwd })`, to total up a results directory (tier-check); the
// `server` command never calls it.
//
// How: a module customization hook (https://nodejs.org/api/module.html#customization-hooks). Loaded with
//   node --import ./conformance/node20-fs-glob.mjs node_modules/@modelcontextprotocol/conformance/dist/index.js server …
// it registers itself with module.register(); its resolve hook answers the specifier "fs", when imported from
// inside node_modules/@modelcontextprotocol/conformance/, with a data: module that re-exports node:fs plus the
// globSync below. Everything else resolves as usual. On Node 22 and later (fs.globSync exists) it does nothing.
//
// The globSync below covers what the CLI asks for: "<name>" and "**/<name>" (a literal file name, at the top
// or at any depth under cwd), returning paths relative to cwd like Node's. Any other pattern throws.

import fs from 'node:fs';
import { register } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { isMainThread } from 'node:worker_threads';

const PACKAGE_DIR = '/node_modules/@modelcontextprotocol/conformance/';

/** The module "fs" resolves to for the conformance package: node:fs, and this file's globSync. */
const SHIM_URL =
  'data:text/javascript,' +
  encodeURIComponent(
    "export * from 'node:fs'; export { default } from 'node:fs'; " +
      `export { globSync } from ${JSON.stringify(import.meta.url)};`
  );

/** fs.globSync for a literal file name at the top of cwd ("name") or at any depth below it ("**\/name"). */
export function globSync(pattern, options = {}) {
  const patterns = Array.isArray(pattern) ? pattern : [pattern];
  if (options.withFileTypes || options.exclude) {
    throw new Error('node20-fs-glob: this globSync stand-in supports neither withFileTypes nor exclude (use Node 22+)');
  }
  const cwd = options.cwd instanceof URL ? fileURLToPath(options.cwd) : String(options.cwd ?? process.cwd());
  const found = new Set();
  for (const p of patterns) {
    const m = /^(\*\*\/)?([^*?[\]{}!/\\]+)$/.exec(String(p));
    if (!m) {
      throw new Error(`node20-fs-glob: this globSync stand-in handles only "<name>" and "**/<name>", not ${JSON.stringify(p)} (use Node 22+)`);
    }
    const [, anyDepth, name] = m;
    if (!anyDepth) {
      if (fs.existsSync(path.join(cwd, name))) found.add(name);
      continue;
    }
    walk(cwd, '', name, found);
  }
  return [...found];
}

/** Depth-first under root/rel; symbolic links are not followed (neither does Node's "**"). */
function walk(root, rel, name, found) {
  let entries;
  try {
    entries = fs.readdirSync(path.join(root, rel), { withFileTypes: true });
  } catch {
    return; // unreadable or vanished directory: Node's glob skips it too
  }
  for (const entry of entries) {
    const child = rel ? path.join(rel, entry.name) : entry.name;
    if (entry.name === name) found.add(child);
    if (entry.isDirectory()) walk(root, child, name, found);
  }
}

/** The resolve hook (runs on the hooks thread). */
export async function resolve(specifier, context, nextResolve) {
  if ((specifier === 'fs' || specifier === 'node:fs') && context.parentURL?.includes(PACKAGE_DIR)) {
    return { url: SHIM_URL, shortCircuit: true };
  }
  return nextResolve(specifier, context);
}

// Registered once, from the main thread's --import; the hooks thread loads this same file and must not
// register again. Nothing to do where fs.globSync exists (Node 22+).
if (isMainThread && typeof fs.globSync !== 'function') register(import.meta.url);
