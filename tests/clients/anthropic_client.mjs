// Drives the `@anthropic-ai/sdk` npm SDK through piapi and prints the answer's text.
//
//   PIAPI_BASE_URL=https://<team server>/piapi/claude_code PIAPI_KEY=<member key> \
//     [PIAPI_AUTH=api-key|auth-token] node anthropic_client.mjs message|message-stream [model]
//
// PIAPI_AUTH=api-key (default) passes the key as `apiKey`, auth-token as
// `authToken`. (SDK 1.x sends both as Authorization: Bearer; the 0.x SDKs
// and Claude Code send an API key as x-api-key. piapi accepts either.)
// stdout: line 1 the answer's text, line 2 `usage=<json>` (what the SDK parsed).
// Any error: message on stderr, exit 1.
import Anthropic from "@anthropic-ai/sdk";

const [mode = "message", model = "claude-opus-5-5"] = process.argv.slice(2);
const baseURL = process.env.PIAPI_BASE_URL;
const key = process.env.PIAPI_KEY;
if (!baseURL || !key) {
  console.error("set PIAPI_BASE_URL and PIAPI_KEY");
  process.exit(2);
}
const auth = (process.env.PIAPI_AUTH || "api-key") === "auth-token"
  ? { apiKey: null, authToken: key }
  : { apiKey: key, authToken: null };
const client = new Anthropic({ baseURL, ...auth, maxRetries: 0, timeout: 30_000 });
const request = { model, max_tokens: 64, messages: [{ role: "user", content: "say hi" }] };

async function main() {
  let text = "";
  let usage = null;
  if (mode === "message") {
    const m = await client.messages.create(request);
    text = m.content.filter((b) => b.type === "text").map((b) => b.text).join("");
    usage = m.usage;
  } else if (mode === "message-stream") {
    const stream = client.messages.stream(request);
    stream.on("text", (delta) => { text += delta; });
    const m = await stream.finalMessage();
    const full = m.content.filter((b) => b.type === "text").map((b) => b.text).join("");
    if (full !== text) {
      throw new Error(`deltas ${JSON.stringify(text)} != final ${JSON.stringify(full)}`);
    }
    if (m.stop_reason !== "end_turn") throw new Error(`stop_reason ${m.stop_reason}`);
    usage = m.usage;
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
  console.log(text);
  console.log("usage=" + JSON.stringify(usage));
}

main().catch((e) => {
  console.error(`anthropic ${mode} failed: ${e?.status ?? ""} ${e?.message ?? e}`);
  process.exit(1);
});
