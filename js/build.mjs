// Bundle the widgets' TypeScript and CSS into the Python package's static folder.
//
//   node build.mjs                 # write ../fabstir_jupyter/notebook/static/
//   node build.mjs --outdir DIR    # write DIR instead (the tests build here and compare)
//
// One ES module and one stylesheet per widget (the anywidget `_esm` and `_css` of each class in
// widgets.py), with their npm dependencies bundled in, plus THIRD_PARTY_LICENSES.txt for the
// bundled packages. The output depends only on the sources and the locked package versions (no
// timestamps, no absolute paths), so a rebuild reproduces the committed files byte for byte.

import { readFileSync, readdirSync, rmSync, mkdirSync, writeFileSync, existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import * as esbuild from "esbuild";

const HERE = dirname(fileURLToPath(import.meta.url));
const WIDGETS = ["stream_output", "host_dashboard", "batch_progress"];
const DEFAULT_OUTDIR = resolve(HERE, "../fabstir_jupyter/notebook/static");

const { values } = parseArgs({ options: { outdir: { type: "string" } } });
const outdir = resolve(values.outdir ?? DEFAULT_OUTDIR);

const banner = (name) =>
  `/* fabstir-jupyter: built from js/src/${name} by js/build.mjs; do not edit. ` +
  `Bundled packages and their licenses: THIRD_PARTY_LICENSES.txt */`;

/** Build one widget's module or stylesheet; return the npm packages it bundled. */
async function bundle(name, ext) {
  const result = await esbuild.build({
    absWorkingDir: HERE,
    entryPoints: [`src/${name}.${ext}`],
    outfile: join(outdir, `${name}.${ext === "ts" ? "js" : "css"}`),
    bundle: true,
    format: "esm",
    platform: "browser",
    target: ["es2020"],
    minify: true,
    legalComments: "none", // the licenses go in THIRD_PARTY_LICENSES.txt
    banner: { [ext === "ts" ? "js" : "css"]: banner(`${name}.${ext}`) },
    metafile: true,
    logLevel: "warning",
  });
  const [output] = Object.values(result.metafile.outputs);
  return Object.entries(output.inputs)
    .filter(([, input]) => input.bytesInOutput > 0) // left after tree shaking
    .map(([path]) => /node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(path)?.[1])
    .filter(Boolean);
}

function licenseText(name) {
  const dir = join(HERE, "node_modules", name);
  const meta = JSON.parse(readFileSync(join(dir, "package.json"), "utf8"));
  const file = readdirSync(dir).sort().find((entry) => /^(licen[cs]e|copying)(\.\w+)?$/i.test(entry));
  const text = file ? readFileSync(join(dir, file), "utf8").trim() : `License: ${meta.license}`;
  return `${name} ${meta.version} (${meta.license})\n\n${text}\n`;
}

if (existsSync(outdir)) rmSync(outdir, { recursive: true });
mkdirSync(outdir, { recursive: true });
const packages = new Set();
for (const name of WIDGETS) {
  for (const ext of ["ts", "css"]) for (const used of await bundle(name, ext)) packages.add(used);
}
const rule = `\n${"=".repeat(78)}\n\n`;
writeFileSync(
  join(outdir, "THIRD_PARTY_LICENSES.txt"),
  "Third-party packages bundled into the widget modules of this folder (built by js/build.mjs).\n" +
    rule + [...packages].sort().map(licenseText).join(rule),
);
console.log(`built ${WIDGETS.length} widgets and ${packages.size} bundled packages' licenses into ${outdir}`);
