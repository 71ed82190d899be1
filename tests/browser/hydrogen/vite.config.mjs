// Builds the Hydrogen app in this directory (see main.js) for the browser tests:
// `vite build --config tests/browser/hydrogen/vite.config.mjs --outDir DIR`.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const sdkDir = dirname(dirname(require.resolve("hydrogen-view-sdk")));

// The SDK's service worker (authenticated media) must be served from the app's root.
const serviceWorker = {
    name: "hydrogen-service-worker",
    generateBundle() {
        this.emitFile({
            type: "asset",
            fileName: "sw.js",
            source: readFileSync(join(sdkDir, "lib-build", "sw.js")),
        });
    },
};

export default {
    root: here,
    base: "./",
    publicDir: false,
    logLevel: "warn",
    plugins: [serviceWorker],
    build: { emptyOutDir: true, chunkSizeWarningLimit: 4096 },
};
