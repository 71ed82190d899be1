// Element's code path, with matrix-js-sdk standing in for Element Web: two users, each a client
// with the Rust crypto stack started by initRustCrypto() (its store in IndexedDB, here
// fake-indexeddb under Node, as Element keeps it in the browser's). They set up cross-signing,
// look for a key backup, then talk in an encrypted room (Olm sessions over /keys/claim and
// /sendToDevice, Megolm room keys, m.room.encrypted events) and in an unencrypted one.
// Prints one line, CRYPTO and JSON of what each side saw; exits 0 on success, 1 otherwise.
//
// usage: node crypto.mjs BASE_URL ALICE ALICE_PASSWORD BOB BOB_PASSWORD
if (typeof Promise.withResolvers !== "function") {
    // Node 20 lacks it; matrix-js-sdk 43 uses it.
    Promise.withResolvers = function withResolvers() {
        let resolve;
        let reject;
        const promise = new Promise((res, rej) => {
            resolve = res;
            reject = rej;
        });
        return { promise, resolve, reject };
    };
}
await import("fake-indexeddb/auto");

const [baseUrl, aliceName, alicePassword, bobName, bobPassword] = process.argv.slice(2);
if (!baseUrl || !bobPassword) {
    console.error("usage: node crypto.mjs BASE_URL ALICE ALICE_PASSWORD BOB BOB_PASSWORD");
    process.exit(2);
}
const deadline = setTimeout(() => {
    console.error("crypto: timed out");
    process.exit(1);
}, 100_000);

const sdk = await import("matrix-js-sdk");
const { logger } = await import("matrix-js-sdk/lib/logger.js");
logger.setLevel("error");

function waitFor(emitter, eventName, predicate) {
    return new Promise((resolve) => {
        const listener = (...args) => {
            if (predicate(...args)) {
                emitter.off(eventName, listener);
                resolve(args);
            }
        };
        emitter.on(eventName, listener);
    });
}

async function start(user, password) {
    const login = await sdk.createClient({ baseUrl }).loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user },
        password,
        initial_device_display_name: `crypto.mjs ${user}`,
    });
    const client = sdk.createClient({
        baseUrl,
        userId: login.user_id,
        accessToken: login.access_token,
        deviceId: login.device_id,
    });
    await client.initRustCrypto({ cryptoDatabasePrefix: `crypto-${user}` });
    const prepared = waitFor(client, sdk.ClientEvent.Sync, (state) => state === "PREPARED");
    await client.startClient({ initialSyncLimit: 10 });
    await prepared;
    const crypto = client.getCrypto();
    await crypto.bootstrapCrossSigning({
        authUploadDeviceSigningKeys: async (makeRequest) => {
            await makeRequest({
                type: "m.login.password",
                identifier: { type: "m.id.user", user },
                password,
            });
        },
    });
    return { client, crypto, login };
}

// The decrypted event with this body, once the client has it in the room's live timeline.
async function received(client, roomId, body) {
    const find = () =>
        client
            .getRoom(roomId)
            ?.getLiveTimeline()
            .getEvents()
            .find((event) => event.getContent()?.body === body && event.status === null);
    while (!find()) {
        await new Promise((resolve) => {
            const done = () => {
                client.off(sdk.MatrixEventEvent.Decrypted, done);
                client.off(sdk.RoomEvent.Timeline, done);
                resolve();
            };
            client.on(sdk.MatrixEventEvent.Decrypted, done);
            client.on(sdk.RoomEvent.Timeline, done);
        });
    }
    return find();
}

async function joined(client, roomId) {
    if (client.getRoom(roomId)?.getMyMembership() === "invite") {
        return;
    }
    await waitFor(
        client,
        sdk.RoomEvent.MyMembership,
        (room, membership) => room.roomId === roomId && membership === "invite",
    );
}

let alice;
let bob;
try {
    alice = await start(aliceName, alicePassword);
    bob = await start(bobName, bobPassword);
    const seen = {
        alice_cross_signing_ready: await alice.crypto.isCrossSigningReady(),
        bob_cross_signing_ready: await bob.crypto.isCrossSigningReady(),
        alice_backup: await alice.crypto.checkKeyBackupAndEnable(),
    };

    const rooms = {};
    for (const encrypted of [true, false]) {
        const { room_id: roomId } = await alice.client.createRoom({
            name: encrypted ? "encrypted" : "plain",
            preset: "private_chat",
            invite: [bob.login.user_id],
            initial_state: encrypted
                ? [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }]
                : [],
        });
        await joined(bob.client, roomId);
        await bob.client.joinRoom(roomId);
        // Alice must see Bob joined before she shares a room key with his devices.
        if (alice.client.getRoom(roomId)?.getMember(bob.login.user_id)?.membership !== "join") {
            await waitFor(
                alice.client,
                sdk.RoomStateEvent.Members,
                (_event, _state, member) =>
                    member.roomId === roomId && member.userId === bob.login.user_id && member.membership === "join",
            );
        }
        const hello = `hello bob ${encrypted ? "in secret" : "in the open"} ${Date.now()}`;
        await alice.client.sendTextMessage(roomId, hello);
        const atBob = await received(bob.client, roomId, hello);
        const reply = `hello alice ${Date.now()}`;
        await bob.client.sendTextMessage(roomId, reply);
        const atAlice = await received(alice.client, roomId, reply);
        rooms[encrypted ? "encrypted" : "plain"] = {
            room_encrypted: await alice.crypto.isEncryptionEnabledInRoom(roomId),
            bob_got: atBob.getContent().body === hello,
            bob_saw_wire_type: atBob.getWireType(),
            bob_decryption_failure: atBob.isDecryptionFailure(),
            alice_got: atAlice.getContent().body === reply,
            alice_saw_wire_type: atAlice.getWireType(),
            alice_decryption_failure: atAlice.isDecryptionFailure(),
        };
    }
    seen.rooms = rooms;
    const bobDevice = await alice.crypto.getDeviceVerificationStatus(bob.login.user_id, bob.login.device_id);
    seen.alice_knows_bob_device = bobDevice !== null;
    seen.bob_device_cross_signed = bobDevice?.signedByOwner ?? null;
    process.stdout.write(`CRYPTO ${JSON.stringify(seen)}\n`);
} catch (err) {
    console.error(`crypto: ${err?.stack ?? err}`);
    process.exitCode = 1;
} finally {
    alice?.client.stopClient();
    bob?.client.stopClient();
    clearTimeout(deadline);
}
process.exit(process.exitCode ?? 0);
