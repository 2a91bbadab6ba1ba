// The sdserve playground: a form over this server's own ModelsLab API. No framework, no build:
// the server answers the bounds (/playground/config), the models (model_list), the key's plan
// (/playground/account), and every rule is checked by the API itself, whose error messages
// start with the field's name and are shown next to that field.
"use strict";

const KEY_STORAGE = "sdserve.apiKey";
const LANG_STORAGE = "sdserve.codeLanguage";
const KEY_PLACEHOLDER = "YOUR_API_KEY";
const TEXT2IMG_PATH = "/api/v6/images/text2img";
// Longest first, so `negative_prompt ...` never matches `prompt`.
const FIELD_NAMES = [
  "num_inference_steps", "embeddings_model", "negative_prompt", "guidance_scale",
  "lora_strength", "lora_model", "model_id", "scheduler", "samples", "prompt", "height",
  "width", "seed", "vae", "upscale",
];
const NUMERIC_FIELDS = new Set(["width", "height", "samples", "num_inference_steps", "guidance_scale"]);
// How often a send is tried while the server is unreachable, busy (429) or briefly down (5xx).
const SEND_ATTEMPTS = 3;
// Fetches in a row that may fail that way while a job runs, before the page says so.
const FETCH_FAILURES_ALLOWED = 30;
// The page waits this long on a job (or ten of its ETAs), then hands it back with "Check again".
const WAIT_LIMIT_S = 600;

const state = {
  config: null,
  sagSchedulers: new Set(),
  models: [],
  account: null,
  lastSizeDefaults: null,
  lastStepsDefault: null,
  pending: null, // a job the page stopped waiting for: { job, key }
};

const $ = (id) => document.getElementById(id);

// ---- money: integer micro-dollars, as the server keeps them -------------------------------

function toMicros(usd) {
  const [whole, frac = ""] = String(usd).trim().split(".");
  return Number(whole || 0) * 1_000_000 + Number((frac + "000000").slice(0, 6));
}

function formatUsd(micros) {
  const text = (micros / 1_000_000).toFixed(6).replace(/0+$/, "").replace(/\.$/, "");
  return `${text}$`;
}

// ---- HTTP -------------------------------------------------------------------------------

// The answer's JSON, with its HTTP status as a non-enumerable `httpStatus` (absent when the
// server did not answer at all).
async function postJSON(path, body, headers = {}) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...headers },
      body: JSON.stringify(body),
    });
  } catch (err) {
    return { status: "error", message: `The server did not answer (${err.message})` };
  }
  let answer;
  try {
    answer = await response.json();
  } catch {
    answer = { status: "error", message: `HTTP ${response.status} ${response.statusText}` };
  }
  if (answer && typeof answer === "object") {
    Object.defineProperty(answer, "httpStatus", { value: response.status });
  }
  return answer;
}

// Worth asking again: no answer, too busy (429) or briefly down (5xx, e.g. its database).
// Any other error is the request's own and final.
function isTransient(answer) {
  return answer.status === "error"
    && (answer.httpStatus === undefined || answer.httpStatus === 429 || answer.httpStatus >= 500);
}

function retryDelayMs(answer, fallbackMs) {
  const seconds = Number(answer.retry_after);
  return Number.isFinite(seconds) && seconds > 0 ? Math.min(seconds, 30) * 1000 : fallbackMs;
}

// crypto.randomUUID needs a secure context; a playground on plain http inside a cluster has none.
function newIdempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `playground-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Seconds since it was made, as "1.2".
function stopwatch() {
  const started = performance.now();
  return () => ((performance.now() - started) / 1000).toFixed(1);
}

// ---- the form ---------------------------------------------------------------------------

function selectedModel() {
  return state.models.find((m) => m.model_id === $("model_id").value) || null;
}

function fieldValue(name) {
  const element = $(name);
  return element ? element.value.trim() : "";
}

// The request body the form describes (without the key). Numbers go as numbers when they
// parse, otherwise as typed, so that the API names what is wrong with them.
function requestBody() {
  const body = {};
  for (const name of ["model_id", "prompt", "negative_prompt", "width", "height", "samples",
    "num_inference_steps", "guidance_scale", "seed", "scheduler"]) {
    const value = fieldValue(name);
    if (name === "seed") {
      body.seed = value === "" ? null : asNumber(value);
    } else if (NUMERIC_FIELDS.has(name)) {
      if (value !== "") body[name] = asNumber(value);
    } else if (value !== "" || name === "prompt") {
      body[name] = value;
    }
  }
  const embedding = fieldValue("embeddings_model");
  if (embedding) body.embeddings_model = embedding;
  const vae = fieldValue("vae");
  if (vae) body.vae = vae;
  if ($("tomesd").checked && !$("tomesd-field").hidden) body.tomesd = "yes";
  if ($("highres_fix").checked) body.highres_fix = "yes";
  if ($("self_attention").checked && !$("self_attention").disabled) body.self_attention = "yes";
  const upscale = fieldValue("upscale");
  if (upscale && !$("upscale-field").hidden) body.upscale = asNumber(upscale);
  if ($("safety_checker").checked && !$("safety_checker").disabled) body.safety_checker = "yes";
  const lora = fieldValue("lora_model");
  if (lora) {
    body.lora_model = lora;
    const strength = fieldValue("lora_strength");
    if (strength !== "") body.lora_strength = asNumber(strength);
  }
  return body;
}

function asNumber(text) {
  return /^-?\d+(\.\d+)?$/.test(text) ? Number(text) : text;
}

function setOptions(select, items, selected) {
  select.replaceChildren(
    ...items.map(({ value, label }) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = label;
      option.selected = value === selected;
      return option;
    }),
  );
}

function applyConfig(config) {
  state.config = config;
  const fields = config.fields;
  const bounds = (name, suffix = "") => {
    const f = fields[name] || {};
    const input = $(name);
    if (f.minimum !== undefined) input.min = f.minimum;
    if (f.maximum !== undefined) input.max = f.maximum;
    if (f.description) input.title = f.description;
    const range = f.minimum !== undefined && f.maximum !== undefined ? `${f.minimum}–${f.maximum}` : "";
    const hint = $(`${name}-hint`);
    if (hint && range) hint.textContent = range + suffix;
  };
  bounds("width", ", multiple of 8");
  bounds("height", ", multiple of 8");
  bounds("samples");
  bounds("num_inference_steps");
  bounds("guidance_scale");
  for (const [name, input] of [["samples", $("samples")], ["num_inference_steps", $("num_inference_steps")],
    ["guidance_scale", $("guidance_scale")]]) {
    if (input.value === "" && fields[name] && fields[name].default !== undefined) {
      input.value = fields[name].default;
    }
  }
  for (const name of ["prompt", "negative_prompt", "seed", "model_id", "scheduler", "lora_model"]) {
    if (fields[name] && fields[name].description) $(name).title = fields[name].description;
  }
  const defaultScheduler = (fields.scheduler && fields.scheduler.default) || config.schedulers[0];
  setOptions(
    $("scheduler"),
    config.schedulers.map((name) => ({ value: name, label: name.replace(/Scheduler$/, "") })),
    defaultScheduler,
  );
  applyLoras(config.loras || []);
  applyEmbeddings(config.embeddings || []);
  applyVaes(config.vaes || []);
  $("upscale-field").hidden = !(config.upscaler && config.upscaler.configured);
  $("tomesd-field").hidden = !config.tomesd;
  state.sagSchedulers = new Set(config.sag_schedulers || []);
  $("scheduler").addEventListener("change", applySagScheduler);
  applySagScheduler();
  applySafetyChecker(config.safety_checker || { configured: false });
  applyModels(config.models, config.default_model_id);
}

function applyEmbeddings(embeddings) {
  setOptions(
    $("embeddings_model"),
    [{ value: "", label: "none" }, ...embeddings.map((id) => ({ value: id, label: id }))],
    "",
  );
  $("embeddings_model-field").hidden = embeddings.length === 0;
}

// SAG needs integer timesteps: the box is off for the schedulers that do not have them.
function applySagScheduler() {
  const supported = state.sagSchedulers.has($("scheduler").value);
  $("self_attention").disabled = !supported;
  if (!supported) $("self_attention").checked = false;
  $("self_attention-hint").textContent = supported
    ? "Sharper detail for one more UNet pass per step."
    : "Not with this scheduler (it needs integer timesteps, e.g. DDIM or UniPC).";
}

function applyVaes(vaes) {
  setOptions(
    $("vae"),
    [{ value: "", label: "the model's" }, ...vaes.map((id) => ({ value: id, label: id }))],
    "",
  );
  $("vae-field").hidden = vaes.length === 0;
}

// Shown only where the server has a checker; "always" checks every image, so the box is set.
function applySafetyChecker(checker) {
  $("safety_checker-field").hidden = !checker.configured;
  const always = checker.mode === "always";
  $("safety_checker").checked = always;
  $("safety_checker").disabled = always;
  if (always) $("safety_checker-hint").textContent = "This server checks every image.";
}

function applyLoras(loras) {
  const select = $("lora_model");
  const current = select.value;
  setOptions(
    select,
    [{ value: "", label: "none" }, ...loras.map((id) => ({ value: id, label: id }))],
    loras.includes(current) ? current : "",
  );
  select.disabled = loras.length === 0;
  $("lora_model-hint").textContent = loras.length === 0 ? "No LoRAs on this server yet." : "";
  onLoraChange();
}

function onLoraChange() {
  $("lora_strength-field").hidden = $("lora_model").value === "";
}

function applyModels(models, preferred) {
  if (!models || models.length === 0) return;
  const current = $("model_id").value || preferred;
  state.models = models;
  const selected = models.some((m) => m.model_id === current) ? current : models[0].model_id;
  setOptions($("model_id"), models.map((m) => ({ value: m.model_id, label: m.model_name || m.model_id })), selected);
  onModelChange();
}

// A new model brings its default size and steps, unless the user typed their own.
function onModelChange() {
  const model = selectedModel();
  if (!model) return;
  if (Array.isArray(model.loras)) applyLoras(model.loras);
  const steps = $("num_inference_steps");
  if (model.default_steps && (state.lastStepsDefault === null
    || steps.value === String(state.lastStepsDefault) || steps.value === "")) {
    steps.value = model.default_steps;
    state.lastStepsDefault = model.default_steps;
  }
  const sizeUntouched = state.lastSizeDefaults === null
    || ($("width").value === String(state.lastSizeDefaults[0])
      && $("height").value === String(state.lastSizeDefaults[1]))
    || ($("width").value === "" && $("height").value === "");
  if (sizeUntouched) {
    $("width").value = model.width;
    $("height").value = model.height;
    state.lastSizeDefaults = [model.width, model.height];
  }
  renderCostLines();
  renderCode();
}

// ---- the key and its plan ---------------------------------------------------------------

// Only a key the server accepted is kept, and only when "Remember" is ticked.
function rememberKey() {
  const key = fieldValue("key");
  if ($("remember-key").checked && key && state.account) localStorage.setItem(KEY_STORAGE, key);
  else if (!$("remember-key").checked || !key) localStorage.removeItem(KEY_STORAGE);
}

async function refreshKey() {
  const key = fieldValue("key");
  clearFieldError("key");
  if (!key) {
    state.account = null;
    $("account").textContent = "";
    rememberKey();
    renderCostLines();
    return;
  }
  const [account, models] = await Promise.all([
    postJSON("/playground/account", { key }),
    postJSON("/api/v4/dreambooth/model_list", { key }),
  ]);
  if (fieldValue("key") !== key) return; // typed on meanwhile
  if (account.status !== "success") {
    state.account = null;
    $("account").textContent = "";
    showFieldError("key", account.message || "Invalid API key");
    if (!isTransient(account) && localStorage.getItem(KEY_STORAGE) === key) {
      localStorage.removeItem(KEY_STORAGE); // revoked since it was remembered
    }
  } else {
    state.account = account;
    $("account").textContent = describeAccount(account);
    rememberKey();
  }
  if (Array.isArray(models)) applyModels(models, state.config && state.config.default_model_id);
  renderCostLines();
}

function describeAccount(account) {
  const plan = account.plan.replaceAll("_", " ");
  if (account.plan === "pay_per_use") return `${account.name}: ${plan}, balance ${formatUsd(toMicros(account.balance_usd))}`;
  if (account.plan === "free") {
    return `${account.name}: free plan, ${account.free_images_left} of ${account.free_images_per_month} free images left this month`;
  }
  return `${account.name}: premium plan, no per-image charge`;
}

// ---- cost -------------------------------------------------------------------------------

function samplesRequested() {
  const n = Number(fieldValue("samples") || 1);
  return Number.isInteger(n) && n > 0 ? n : 1;
}

function renderCostLines() {
  const model = selectedModel();
  const line = $("price-line");
  const estimate = $("cost-estimate");
  if (!model) {
    line.textContent = "";
    estimate.textContent = "";
    return;
  }
  const unit = toMicros(model.price_per_image_usd);
  line.textContent = `Per image generation will cost ${formatUsd(unit)}`;
  const n = samplesRequested();
  const account = state.account;
  if (!account) {
    estimate.textContent = "";
  } else if (account.plan === "pay_per_use") {
    const cost = `This request: ${n} × ${formatUsd(unit)} = ${formatUsd(unit * n)}`;
    estimate.textContent = unit * n > toMicros(account.balance_usd)
      ? `${cost}, more than your balance: it will be refused.`
      : `${cost} from your balance.`;
  } else if (account.plan === "free") {
    const left = account.free_images_left;
    estimate.textContent = n > left
      ? `This request needs ${n} images, but only ${left} of your free images are left this month: it will be refused.`
      : `This request uses ${n} of your ${left} free images left this month (0$).`;
  } else {
    estimate.textContent = "Premium plan: this request costs 0$.";
  }
}

function callCost(images, modelId) {
  const model = state.models.find((m) => m.model_id === modelId) || selectedModel();
  const unit = model ? toMicros(model.price_per_image_usd) : 0;
  const plan = state.account ? state.account.plan : null;
  if (plan === "free") return `0$ (${images} of your free monthly images)`;
  if (plan === "premium") return "0$ (premium plan)";
  const total = `${formatUsd(unit * images)} (${images} × ${formatUsd(unit)})`;
  return plan === "pay_per_use" ? total : `${total} on a pay-per-use key`;
}

// ---- errors next to their fields ----------------------------------------------------------

function fieldOf(message) {
  for (const name of FIELD_NAMES) {
    if (message.startsWith(`${name} `) || message.startsWith(`${name}.`) || message.startsWith(`${name}:`)) {
      return name;
    }
  }
  return /API key/i.test(message) ? "key" : null;
}

// "width must be ...; samples must be ..." -> one part per field; a part that names no
// field belongs to the part before it ("model_id 'x' is not available; available models: a").
function splitMessage(message) {
  const parts = [];
  for (const piece of String(message).split("; ")) {
    if (parts.length > 0 && fieldOf(piece) === null) parts[parts.length - 1] += `; ${piece}`;
    else parts.push(piece);
  }
  return parts;
}

function showApiError(message) {
  const general = [];
  let first = null;
  for (const part of splitMessage(message)) {
    const name = fieldOf(part);
    if (name && $(name)) {
      showFieldError(name, part);
      first = first || name;
    } else {
      general.push(part);
    }
  }
  $("form-error").textContent = general.join("; ");
  if (first) {
    const input = $(first);
    const details = input.closest("details");
    if (details) details.open = true;
    input.focus({ preventScroll: true });
    input.scrollIntoView({ block: "center", behavior: "smooth" });
  }
}

function showFieldError(name, message) {
  const box = $(`${name}-error`);
  const input = $(name);
  if (box) box.textContent = message;
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", `${name}-error`);
  }
}

function clearFieldError(name) {
  const box = $(`${name}-error`);
  if (box) box.textContent = "";
  const input = $(name);
  if (input) input.removeAttribute("aria-invalid");
}

function clearErrors() {
  for (const name of [...FIELD_NAMES, "key"]) clearFieldError(name);
  $("form-error").textContent = "";
}

// ---- generate ---------------------------------------------------------------------------

function setStatus(kind, text) {
  const badge = $("status");
  badge.className = `status status-${kind}`;
  badge.textContent = text;
}

function showPlaceholders(count, width, height) {
  const gallery = $("gallery");
  gallery.replaceChildren();
  $("nsfw-note").hidden = true;
  for (let i = 0; i < count; i += 1) {
    const box = document.createElement("div");
    box.className = "placeholder";
    box.style.aspectRatio = `${width} / ${height}`;
    gallery.append(box);
  }
}

function showImages(urls, width, height, flags = []) {
  const gallery = $("gallery");
  const flagged = flags.filter(Boolean).length;
  $("nsfw-note").hidden = flagged === 0;
  $("nsfw-note").textContent = flagged === 0 ? ""
    : `The safety checker flagged ${flagged} of ${urls.length} image${urls.length === 1 ? "" : "s"}: replaced as the request asked.`;
  gallery.replaceChildren(
    ...urls.map((url, i) => {
      const figure = document.createElement("figure");
      const link = document.createElement("a");
      link.href = url;
      link.target = "_blank";
      link.rel = "noopener";
      const img = document.createElement("img");
      img.src = url;
      img.alt = `Generated image ${i + 1} of ${urls.length}`;
      img.style.aspectRatio = `${width} / ${height}`;
      link.append(img);
      const caption = document.createElement("figcaption");
      caption.textContent = flags[i] ? `${width}×${height}, flagged` : `${width}×${height}`;
      figure.append(link, caption);
      return figure;
    }),
  );
}

function showResult(job) {
  const meta = job.meta || {};
  $("result-time").textContent = `${Number(job.generationTime).toFixed(2)} s`;
  $("result-seed").textContent = String(meta.seed);
  const factor = Number(meta.upscale) || 1;
  const size = `${meta.width * factor}×${meta.height * factor}`;
  $("result-size").textContent = `${size}${factor > 1 ? ` (${factor}× upscaled)` : ""}, ${job.output.length} image${job.output.length === 1 ? "" : "s"}`;
  $("result-cost").textContent = callCost(job.output.length, meta.model_id);
  // Options the server could not honour for this request are said, never silently dropped.
  const notApplied = Array.isArray(meta.not_applied) ? meta.not_applied : [];
  $("result-not-applied").textContent = notApplied.join("; ");
  $("result-not-applied-row").hidden = notApplied.length === 0;
  $("result").hidden = false;
}

// A number box holding what is no number reads as "" and would silently send the default.
function badNumbers() {
  return [...document.querySelectorAll("#playground-form input[type=number]")]
    .filter((input) => input.validity.badInput && !input.closest("[hidden]"))
    .map((input) => `${input.name} must be a number`);
}

// One Idempotency-Key per click: a send retried after a lost answer never makes (or charges
// for) a second job.
async function send(body) {
  const headers = { "Idempotency-Key": newIdempotencyKey() };
  for (let attempt = 1; ; attempt += 1) {
    const answer = await postJSON(TEXT2IMG_PATH, body, headers);
    if (!isTransient(answer) || attempt >= SEND_ATTEMPTS) return answer;
    setStatus("processing", `Sending again (${answer.message})…`);
    await sleep(retryDelayMs(answer, 1000 * attempt));
  }
}

// Polls this server's own fetch route (`fetch_result` carries the configured public URL, which
// a browser on another address may not reach) until the job ends, the page's patience runs
// out, or the server stays unreachable; then `job` is still "processing" and `why` says why.
async function waitFor(job, key, elapsed) {
  const waited = performance.now();
  const patienceS = Math.max(WAIT_LIMIT_S, 10 * (Number(job.eta) || 0));
  let failures = 0;
  while (job.status === "processing") {
    const seconds = (performance.now() - waited) / 1000;
    if (seconds > patienceS) {
      return { job, why: `Job ${job.id} is still processing after ${Math.round(seconds)} s.` };
    }
    setStatus("processing", `Processing… ${elapsed()} s`);
    await sleep(seconds < 10 ? 400 : 1500);
    const next = await postJSON(`/api/v6/images/fetch/${job.id}`, { key });
    if (isTransient(next)) {
      failures += 1;
      if (failures >= FETCH_FAILURES_ALLOWED) {
        return { job, why: `Job ${job.id} could not be checked: ${next.message}.` };
      }
      await sleep(retryDelayMs(next, 0));
      continue;
    }
    failures = 0;
    job = next;
  }
  return { job, why: null };
}

async function generate(event) {
  event.preventDefault();
  clearErrors();
  $("pending").hidden = true;
  const key = fieldValue("key");
  if (!key) {
    showFieldError("key", "key is required: paste your API key");
    $("key").focus();
    return;
  }
  const bad = badNumbers();
  if (bad.length > 0) {
    showApiError(bad.join("; "));
    return;
  }
  const button = $("generate");
  button.disabled = true;
  $("result").hidden = true;
  const elapsed = stopwatch();
  try {
    setStatus("processing", "Sending…");
    const job = await send({ key, ...requestBody(), instant_response: "yes" });
    if (job.status === "processing") {
      const meta = job.meta || {};
      showPlaceholders(job.future_links.length, meta.width || 1, meta.height || 1);
    }
    await settle(job, key, elapsed);
  } finally {
    button.disabled = false;
  }
}

// "Check again" on a job the page stopped waiting for.
async function checkAgain() {
  const { job, key } = state.pending;
  $("pending").hidden = true;
  $("generate").disabled = true;
  try {
    await settle(job, key, stopwatch());
  } finally {
    $("generate").disabled = false;
  }
}

async function settle(first, key, elapsed) {
  const { job, why } = first.status === "processing" ? await waitFor(first, key, elapsed)
    : { job: first, why: null };
  if (job.status === "success") {
    const meta = job.meta || {};
    const factor = Number(meta.upscale) || 1;  // "no" or the factor
    showImages(job.output, meta.width * factor, meta.height * factor, meta.nsfw_flags || []);
    showResult(job);
    setStatus("success", `Done in ${elapsed()} s`);
    refreshKey();
  } else if (job.status === "processing") {
    // The job exists and may still finish: never "nothing was generated", never a second job.
    state.pending = { job, key };
    setStatus("processing", "Still processing");
    $("pending-text").textContent = `${why} It may still finish: check again to see its `
      + "images; generating again would make (and charge for) a second job.";
    $("pending").hidden = false;
  } else if (job.status === "failed") {
    $("gallery").replaceChildren();
    setStatus("failed", "Failed");
    $("form-error").textContent = job.message;
  } else {
    setStatus("error", "Error");
    $("gallery").replaceChildren(emptyNote("Nothing was generated."));
    showApiError(job.message || "Unexpected answer from the server");
  }
}

function emptyNote(text) {
  const p = document.createElement("p");
  p.className = "empty";
  p.textContent = text;
  return p;
}

// ---- code panel -------------------------------------------------------------------------

function pyValue(value) {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  return JSON.stringify(String(value)); // a JSON string is a valid Python string literal
}

function phpValue(value) {
  if (value === null || value === undefined) return "null";
  if (typeof value === "number") return String(value);
  return `'${String(value).replaceAll("\\", "\\\\").replaceAll("'", "\\'")}'`;
}

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

function snippetBody() {
  return { key: KEY_PLACEHOLDER, ...requestBody() };
}

const SNIPPETS = {
  python(origin, body) {
    const fields = Object.entries(body).map(([k, v]) => `    ${JSON.stringify(k)}: ${pyValue(v)},`);
    return [
      "import time",
      "",
      "import requests",
      "",
      `BASE_URL = ${JSON.stringify(origin)}`,
      "",
      "payload = {",
      ...fields,
      "}",
      `body = requests.post(BASE_URL + "${TEXT2IMG_PATH}", json=payload, timeout=300).json()`,
      "while body[\"status\"] == \"processing\":  # past the server's sync window: poll",
      "    time.sleep(2)",
      "    body = requests.post(body[\"fetch_result\"], json={\"key\": payload[\"key\"]}, timeout=60).json()",
      "if body[\"status\"] != \"success\":",
      "    raise SystemExit(body[\"message\"])",
      "print(body[\"output\"])",
      "",
    ].join("\n");
  },

  modelslab(origin, body) {
    const ints = new Set(["width", "height", "samples", "num_inference_steps", "seed"]);
    const args = [];
    for (const [k, v] of Object.entries(body)) {
      if (k === "key" || v === null || v === undefined) continue;
      const typed = ints.has(k) && typeof v === "number" ? Math.trunc(v) : v;
      args.push(`        ${k}=${pyValue(typed)},`);
    }
    return [
      "from modelslab_py.core.apis.community import Community",
      "from modelslab_py.core.client import Client",
      "from modelslab_py.schemas.community import Text2Image",
      "",
      `client = Client(api_key=${pyValue(body.key)})`,
      `client.base_url = ${JSON.stringify(`${origin}/api/`)}  # this server instead of modelslab.com`,
      "api = Community(client=client, enterprise=False)  # after base_url: it builds its URLs from it",
      "response = api.text_to_image(",
      "    Text2Image(",
      ...args,
      "    )",
      ")",
      "print(response[\"status\"], response.get(\"output\"), response.get(\"fetch_result\"))",
      "",
    ].join("\n");
  },

  javascript(origin, body) {
    const literal = JSON.stringify(body, null, 2).replaceAll("\n", "\n  ");
    return [
      `const response = await fetch(${JSON.stringify(origin + TEXT2IMG_PATH)}, {`,
      "  method: \"POST\",",
      "  headers: { \"Content-Type\": \"application/json\" },",
      `  body: JSON.stringify(${literal}),`,
      "});",
      "const body = await response.json();",
      "// \"processing\": POST body.fetch_result with { key } until the status changes",
      "console.log(body.status, body.output);",
      "",
    ].join("\n");
  },

  curl(origin, body) {
    return [
      `curl -X POST ${shellQuote(origin + TEXT2IMG_PATH)} \\`,
      "  -H 'Content-Type: application/json' \\",
      `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
      "",
    ].join("\n");
  },

  php(origin, body) {
    const fields = Object.entries(body).map(([k, v]) => `    ${phpValue(k)} => ${phpValue(v)},`);
    return [
      "<?php",
      "$payload = [",
      ...fields,
      "];",
      `$curl = curl_init(${phpValue(origin + TEXT2IMG_PATH)});`,
      "curl_setopt_array($curl, [",
      "    CURLOPT_POST => true,",
      "    CURLOPT_RETURNTRANSFER => true,",
      "    CURLOPT_HTTPHEADER => ['Content-Type: application/json'],",
      "    CURLOPT_POSTFIELDS => json_encode($payload),",
      "]);",
      "$body = json_decode(curl_exec($curl), true);",
      "curl_close($curl);",
      "print_r($body['output'] ?? $body);",
      "",
    ].join("\n");
  },
};

function currentLanguage() {
  const stored = localStorage.getItem(LANG_STORAGE);
  return SNIPPETS[stored] ? stored : "python";
}

function renderCode() {
  const lang = currentLanguage();
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.lang === lang));
  }
  $("code-snippet").textContent = SNIPPETS[lang](location.origin, snippetBody());
  $("code-snippet").dataset.lang = lang;
}

async function copyCode() {
  const text = $("code-snippet").textContent;
  const button = $("copy-code");
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    const range = document.createRange();
    range.selectNodeContents($("code-snippet"));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    button.textContent = "Selected";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

// ---- start ------------------------------------------------------------------------------

async function start() {
  const form = $("playground-form");
  form.addEventListener("submit", generate);
  form.addEventListener("input", (event) => {
    if (event.target.name && event.target.name !== "key") clearFieldError(event.target.name);
    renderCostLines();
    renderCode();
  });
  form.addEventListener("change", renderCode);
  $("model_id").addEventListener("change", onModelChange);
  $("lora_model").addEventListener("change", onLoraChange);
  $("key").addEventListener("change", refreshKey);
  $("remember-key").addEventListener("change", rememberKey);
  $("check-again").addEventListener("click", checkAgain);
  $("toggle-key").addEventListener("click", () => {
    const input = $("key");
    const show = input.type === "password";
    input.type = show ? "text" : "password";
    $("toggle-key").textContent = show ? "Hide" : "Show";
    $("toggle-key").setAttribute("aria-pressed", String(show));
  });
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => {
      localStorage.setItem(LANG_STORAGE, tab.dataset.lang);
      renderCode();
    });
  }
  $("copy-code").addEventListener("click", copyCode);

  $("key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("remember-key").checked = $("key").value !== "";
  const response = await fetch("/playground/config");
  applyConfig(await response.json());
  renderCode();
  if ($("key").value) await refreshKey();
  document.body.dataset.ready = "true";
}

start();
