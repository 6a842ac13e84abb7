// Copies the onnxruntime-web files the page loads into anyseg/server/static/ort/ (git-ignored).
// The app's own HTML / JS / CSS are plain ES modules served as they are from anyseg/server/static/,
// so this is the only build step: `npm ci && npm run build` (or `make web`).
import { copyFileSync, existsSync, mkdirSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const source = join(here, 'node_modules', 'onnxruntime-web', 'dist');
const target = join(here, '..', 'anyseg', 'server', 'static', 'ort');
// The WebAssembly-only build: its ES module, the Emscripten loader and the SIMD wasm binary.
const files = ['ort.wasm.min.mjs', 'ort-wasm-simd-threaded.mjs', 'ort-wasm-simd-threaded.wasm'];

if (!existsSync(source)) {
  console.error(`onnxruntime-web is not installed in ${source}; run 'npm ci' in web/ first`);
  process.exit(1);
}
mkdirSync(target, { recursive: true });
for (const name of files) {
  const from = join(source, name);
  const to = join(target, name);
  if (existsSync(to) && statSync(to).size === statSync(from).size && statSync(to).mtimeMs >= statSync(from).mtimeMs) {
    continue;
  }
  copyFileSync(from, to);
  console.log(`copied ${name}`);
}
console.log(`onnxruntime-web runtime ready in ${target}`);
