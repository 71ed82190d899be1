// Hydrogen's own web app start-up (hydrogen-web src/platform/web/main.js and index.html), built
// from the published SDK: the same RootViewModel/RootView, login screen, room list, timeline and
// composer a person gets at hydrogen.element.io. The homeserver is typed into the login screen.
import {
    FeatureSet,
    Platform,
    RootViewModel,
    createNavigation,
    createRouter,
} from "hydrogen-view-sdk";
import downloadSandbox from "hydrogen-view-sdk/download-sandbox.html?url";
import worker from "hydrogen-view-sdk/main.js?url";
import olmWasm from "@matrix-org/olm/olm.wasm?url";
import olmJs from "@matrix-org/olm/olm.js?url";
import olmLegacyJs from "@matrix-org/olm/olm_legacy.js?url";
import "hydrogen-view-sdk/theme-element-light.css";

const assetPaths = {
    downloadSandbox,
    worker,
    olm: { wasm: olmWasm, legacyBundle: olmLegacyJs, wasmBundle: olmJs },
    serviceWorker: "sw.js",
};

async function main() {
    const platform = new Platform({
        container: document.body,
        assetPaths,
        config: { defaultHomeServer: "" },
        options: { development: false },
    });
    await platform.init();
    const features = await FeatureSet.load(platform.settingsStorage);
    const navigation = createNavigation();
    platform.setNavigation(navigation);
    const urlRouter = createRouter({ navigation, history: platform.history });
    urlRouter.attach();
    const vm = new RootViewModel({ platform, urlRouter, navigation, features });
    await vm.load();
    platform.createAndMountRootView(vm);
}

main().catch((err) => {
    console.error(`hydrogen start-up failed: ${err.message}\n${err.stack}`);
});
