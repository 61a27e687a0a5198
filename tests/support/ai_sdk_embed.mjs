// The Vercel AI SDK's embedMany against the gateway, as its users call it:
// `openai.embedding(model)` (POST /v1/embeddings). Prints one JSON line of what it got.
// Run from a folder whose node_modules holds `ai` and `@ai-sdk/openai`.
import { embedMany } from "ai";
import { createOpenAI } from "@ai-sdk/openai";

const openai = createOpenAI({ baseURL: `${process.env.GATEWAY_URL}/v1`, apiKey: "unused" });
const model = openai.embedding(process.env.MODEL);
const values = JSON.parse(process.env.VALUES);
const { embeddings, usage } = await embedMany({ model, values, maxRetries: 0 });
console.log(JSON.stringify({ embeddings, usage }));
