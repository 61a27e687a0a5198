// The Vercel AI SDK against the gateway, as its users call it: `openai(model)` (the
// Responses API) with generateText and streamText. Prints one JSON line of what it got.
// Run from a folder whose node_modules holds `ai` and `@ai-sdk/openai`.
import { generateText, streamText } from "ai";
import { createOpenAI } from "@ai-sdk/openai";

const openai = createOpenAI({ baseURL: `${process.env.GATEWAY_URL}/v1`, apiKey: "unused" });
const model = openai(process.env.MODEL);
const out = {};
const generated = await generateText({ model, prompt: "Say something." });
out.generate = { text: generated.text, finishReason: generated.finishReason, usage: generated.usage };
const streamed = streamText({ model, prompt: "Say something else." });
let text = "";
for await (const delta of streamed.textStream) text += delta;
out.stream = { text, finishReason: await streamed.finishReason, usage: await streamed.usage };
console.log(JSON.stringify(out));
