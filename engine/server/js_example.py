"""The JavaScript client example shown on /docs and in the README: a browser page and a Node script that
stream ``/generate/stream`` with ``fetch`` and a stream reader (the tests run both against a real server)."""

from __future__ import annotations

# Shared by the page and the Node script (Node >= 18 has fetch and web streams).
CLIENT_JS = """\
// Yields {event, data} for each server-sent event as the bytes arrive.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

// Streams one completion: onToken({text, source, ...}) per token; resolves to the `done` event
// ({finish_reason, tail, stats}); throws with the server's message on an HTTP error (e.g. 401).
async function generate(url, apiKey, prompt, onToken) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey) headers["Authorization"] = `Bearer ${apiKey}`;
  const response = await fetch(`${url}/generate/stream`, {
    method: "POST", headers,
    body: JSON.stringify({ prompt, max_new_tokens: 64, temperature: 0 }),
  });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(`HTTP ${response.status}: ${body.error?.message ?? response.statusText}`);
  }
  for await (const { event, data } of sseEvents(response)) {
    if (event === "token") onToken(data);
    else if (event === "error") throw new Error(data.message);
    else if (event === "done") return data;
  }
  throw new Error("the stream ended without a done event");
}
"""

BROWSER_PAGE = f"""\
<!doctype html>
<meta charset="utf-8">
<title>Helix: streaming from the browser</title>
<!-- serve this page from an origin the server allows: python main.py serve --cors-origin http://localhost:3000 -->
<input id="url" value="http://127.0.0.1:8000" size="28">
<input id="key" type="password" placeholder="API key (if the server has one)">
<input id="prompt" value="Once upon a time" size="40">
<button id="go">Generate</button>
<pre id="out" style="white-space: pre-wrap"></pre>
<p id="stats"></p>
<p id="error" style="color: #c00"></p>
<script>
{CLIENT_JS}
const $ = (id) => document.getElementById(id);
$("go").onclick = async () => {{
  $("out").textContent = $("stats").textContent = $("error").textContent = "";
  try {{
    const done = await generate($("url").value, $("key").value, $("prompt").value,
                                (token) => {{ $("out").textContent += token.text; }});
    $("out").textContent += done.tail;
    const s = done.stats;
    $("stats").textContent = `${{done.finish_reason}}: ${{s.num_generated_tokens}} tokens, ` +
      `${{s.tokens_per_second.toFixed(1)}} tok/s, acceptance ${{(s.acceptance_rate * 100).toFixed(0)}}%`;
  }} catch (err) {{
    $("error").textContent = err.message;
  }}
}};
</script>
"""

NODE_SCRIPT = f"""\
// node helix-stream.mjs "Once upon a time"   (HELIX_URL and HELIX_API_KEY from the environment)
{CLIENT_JS}
const url = process.env.HELIX_URL ?? "http://127.0.0.1:8000";
try {{
  const done = await generate(url, process.env.HELIX_API_KEY, process.argv[2] ?? "Once upon a time",
                              (token) => process.stdout.write(token.text));
  process.stdout.write(done.tail + "\\n");
  const s = done.stats;
  console.error(`${{done.finish_reason}}: ${{s.num_generated_tokens}} tokens, ${{s.tokens_per_second.toFixed(1)}} tok/s`);
}} catch (err) {{
  console.error(`error: ${{err.message}}`);
  process.exitCode = 1;
}}
"""

DOCS_MARKDOWN = f"""
**JavaScript.** A browser page (served from an origin given to `serve --cors-origin`) that streams
`/generate/stream` with `fetch` and a stream reader:

```html
{BROWSER_PAGE}```

The same from Node 18+ (`node helix-stream.mjs "Once upon a time"`):

```js
{NODE_SCRIPT}```
"""
