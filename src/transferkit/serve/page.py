"""The upload page at / (no build step, no external assets)."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>transferkit serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 15px/1.4 system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; color: #222 }
 fieldset { border: 1px solid #ccc; padding: 1rem } label { display: block; margin: .4rem 0 }
 table { border-collapse: collapse; margin-top: 1rem } td, th { padding: .2rem .8rem; border-bottom: 1px solid #eee; text-align: left }
 #error { color: #b00 } img { max-width: 8rem; image-rendering: pixelated; margin-top: .5rem }
</style></head><body>
<h1>transferkit serve</h1>
<form id="form">
 <fieldset>
  <label>Model <select id="model" name="model"></select></label>
  <label>Image <input id="file" name="file" type="file" accept="image/*" required></label>
  <label>Top k <input id="topk" type="number" min="1" value="3" style="width:4rem"></label>
  <label>Bearer token (if the server needs one) <input id="token" type="password" autocomplete="off"></label>
  <button id="submit" type="submit">Classify</button>
 </fieldset>
</form>
<img id="preview" alt="" hidden>
<p id="status"></p><p id="error" role="alert"></p>
<table id="result" hidden><thead><tr><th>label</th><th>probability</th></tr></thead><tbody></tbody></table>
<script>
const $ = (id) => document.getElementById(id);
function auth() { const t = $("token").value.trim(); return t ? {Authorization: "Bearer " + t} : {}; }
async function loadModels() {
  const r = await fetch("/v1/models", {headers: auth()});
  if (!r.ok) { $("error").textContent = (await r.json()).detail || r.statusText; return; }
  const sel = $("model"); sel.innerHTML = "";
  for (const m of (await r.json()).models) {
    const o = document.createElement("option"); o.value = m.name;
    o.textContent = m.name + (m.version ? " v" + m.version : " (loading)"); sel.appendChild(o);
  }
}
$("token").addEventListener("change", loadModels);
$("file").addEventListener("change", () => {
  const f = $("file").files[0]; if (f) { $("preview").src = URL.createObjectURL(f); $("preview").hidden = false; }
});
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("error").textContent = ""; $("status").textContent = "classifying..."; $("result").hidden = true;
  const fd = new FormData(); fd.append("file", $("file").files[0]);
  const url = "/v1/models/" + encodeURIComponent($("model").value) + "/predict?top_k=" + encodeURIComponent($("topk").value);
  try {
    const r = await fetch(url, {method: "POST", body: fd, headers: auth()});
    const body = await r.json();
    if (!r.ok) { $("status").textContent = ""; $("error").textContent = r.status + ": " + body.detail; return; }
    const tb = $("result").querySelector("tbody"); tb.innerHTML = "";
    for (const p of body.predictions[0].top_k) {
      const tr = document.createElement("tr");
      tr.innerHTML = "<td class=label></td><td class=prob></td>";
      tr.querySelector(".label").textContent = p.label;
      tr.querySelector(".prob").textContent = (100 * p.probability).toFixed(2) + "%";
      tb.appendChild(tr);
    }
    $("result").hidden = false;
    $("status").textContent = body.model + " version " + body.version + " (" + body.provider + ")";
    $("status").dataset.version = body.version;
  } catch (e) { $("status").textContent = ""; $("error").textContent = String(e); }
});
loadModels();
</script></body></html>
"""
