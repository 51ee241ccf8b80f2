// The whole build: copy hls.js's ES-module bundle (installed by `npm ci` from the
// lock file) into web/dist/, where the server serves it as /static/dist/hls.mjs.
// Our own pages are plain ES modules and need no build step.
import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const pkgDir = dirname(require.resolve("hls.js/package.json"));
const version = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8")).version;
const out = join(here, "dist");

mkdirSync(out, { recursive: true });
copyFileSync(join(pkgDir, "dist", "hls.min.mjs"), join(out, "hls.mjs"));
copyFileSync(join(pkgDir, "LICENSE"), join(out, "hls.LICENSE.txt"));
console.log(`web build: hls.js ${version} -> dist/hls.mjs`);
