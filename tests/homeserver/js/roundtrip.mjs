// A real third-party client (matrix-js-sdk from npm) against a homeserver:
// login, create a room, send, sync until the message is in the timeline, read it back with
// /messages, upload and download media. Prints one line, ROUNDTRIP and JSON of what it saw (the SDK's
// own logging also goes to stdout); exits 0 on
// success, 1 with a message on stderr otherwise.
//
// usage: node roundtrip.mjs BASE_URL USER PASSWORD
// Node 20 lacks Promise.withResolvers, which matrix-js-sdk 43 uses: polyfill before import.
if (typeof Promise.withResolvers !== "function") {
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

const [baseUrl, user, password] = process.argv.slice(2);
if (!baseUrl || !user || !password) {
    console.error("usage: node roundtrip.mjs BASE_URL USER PASSWORD");
    process.exit(2);
}
const deadline = setTimeout(() => {
    console.error("roundtrip: timed out");
    process.exit(1);
}, 60_000);

const sdk = await import("matrix-js-sdk");
// The SDK logs at debug level to stdout by default; stdout is for our one JSON line.
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

let client;
try {
    const loginClient = sdk.createClient({ baseUrl });
    const login = await loginClient.loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user },
        password,
    });
    client = sdk.createClient({
        baseUrl,
        userId: login.user_id,
        accessToken: login.access_token,
        deviceId: login.device_id,
    });
    const whoami = await client.whoami();

    const prepared = waitFor(client, sdk.ClientEvent.Sync, (state) => state === "PREPARED");
    await client.startClient({ initialSyncLimit: 10 });
    await prepared;

    const { room_id: roomId } = await client.createRoom({ name: "js-sdk room", preset: "private_chat" });
    const body = `hello from matrix-js-sdk ${Date.now()}`;
    const { event_id: eventId } = await client.sendTextMessage(roomId, body);
    // The remote echo: the event as the server's /sync delivered it, no longer pending.
    const synced = () =>
        client
            .getRoom(roomId)
            ?.getLiveTimeline()
            .getEvents()
            .find((event) => event.getId() === eventId && event.status === null);
    if (!synced()) {
        await waitFor(client, sdk.ClientEvent.Sync, () => Boolean(synced()));
    }
    const timelineEvent = synced();

    const page = await client.createMessagesRequest(roomId, null, 10, sdk.Direction.Backward);
    const readBack = page.chunk.find((event) => event.event_id === eventId);

    const upload = await client.uploadContent(Buffer.from("js-sdk media"), {
        name: "js.txt",
        type: "text/plain",
    });
    const mediaUrl = client.mxcUrlToHttp(upload.content_uri, undefined, undefined, undefined, false, true, true);
    const media = await fetch(mediaUrl, { headers: { Authorization: `Bearer ${login.access_token}` } });
    const mediaText = await media.text();

    const room = client.getRoom(roomId);
    process.stdout.write(
        "ROUNDTRIP " +
        JSON.stringify({
            user_id: login.user_id,
            whoami: whoami.user_id,
            room_id: roomId,
            room_name: room?.name ?? null,
            event_id: eventId,
            timeline_event_id: timelineEvent.getId(),
            read_back: readBack ? readBack.content.body : null,
            body,
            content_uri: upload.content_uri,
            media_status: media.status,
            media_text: mediaText,
        }) +
        "\n",
    );
} catch (err) {
    console.error(`roundtrip: ${err?.stack ?? err}`);
    process.exitCode = 1;
} finally {
    client?.stopClient();
    clearTimeout(deadline);
}
// stopClient() leaves an aborted long-poll and timers behind; do not wait for them.
process.exit(process.exitCode ?? 0);
