// build.mjs — bundle proxy.ts into dist/proxy.js (ESM, node: built-ins only).
// esbuild strips the types; nothing is bundled in because proxy.ts imports nothing but `node:` modules.
import { build } from 'esbuild';

await build({
  entryPoints: ['proxy.ts'],
  outfile: 'dist/proxy.js',
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  external: ['node:*'],
  banner: { js: '#!/usr/bin/env node' },
  legalComments: 'inline',
  logLevel: 'warning',
});
