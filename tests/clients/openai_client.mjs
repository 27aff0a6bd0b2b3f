// Drives the `openai` npm SDK through piapi and prints the answer's text.
//
//   PIAPI_BASE_URL=https://<team server>/piapi/codex PIAPI_KEY=<member key> \
//     node openai_client.mjs chat|chat-stream|responses|responses-stream [model]
//
// stdout: line 1 the answer's text, line 2 `usage=<json>` (what the SDK parsed).
// Any error: message on stderr, exit 1.
import OpenAI from "openai";

const [mode = "chat", model = "gpt-5"] = process.argv.slice(2);
const baseURL = process.env.PIAPI_BASE_URL;
const apiKey = process.env.PIAPI_KEY;
if (!baseURL || !apiKey) {
  console.error("set PIAPI_BASE_URL and PIAPI_KEY");
  process.exit(2);
}
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30_000 });
const messages = [{ role: "user", content: "say hi" }];

async function main() {
  let text = "";
  let usage = null;
  if (mode === "chat") {
    const r = await client.chat.completions.create({ model, messages });
    text = r.choices[0].message.content;
    usage = r.usage;
  } else if (mode === "chat-stream") {
    const stream = await client.chat.completions.create({
      model, messages, stream: true, stream_options: { include_usage: true },
    });
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta?.content ?? "";
      if (chunk.usage) usage = chunk.usage;
    }
  } else if (mode === "responses") {
    const r = await client.responses.create({ model, input: "say hi" });
    text = r.output_text;
    usage = r.usage;
  } else if (mode === "responses-stream") {
    const stream = client.responses.stream({ model, input: "say hi" });
    stream.on("response.output_text.delta", (ev) => { text += ev.delta; });
    const final = await stream.finalResponse();
    if (final.output_text !== text) {
      throw new Error(`deltas ${JSON.stringify(text)} != output_text ${JSON.stringify(final.output_text)}`);
    }
    usage = final.usage;
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
  console.log(text);
  console.log("usage=" + JSON.stringify(usage));
}

main().catch((e) => {
  console.error(`openai ${mode} failed: ${e?.status ?? ""} ${e?.message ?? e}`);
  process.exit(1);
});
