// The page at / : classify an image with this service's API (same origin, nothing from other hosts).
// No inline handlers and no style attributes in the markup, so a strict Content-Security-Policy fits.
"use strict";

(() => {
  const KEY_STORE = "imgpipe.apiKey"; // sessionStorage: the key lives as long as this tab
  const TOP_K = 5;
  const METHODS = { class_activation_map: "class-activation map", occlusion: "occlusion sensitivity" };
  const $ = (id) => document.getElementById(id);

  let latest = 0;         // number of the latest classification: answers to older ones are dropped
  let retry = null;       // the classification to run again once a key is entered
  let modelLoaded = false;
  let pictureUrl = null;  // object URL of the picture shown, revoked when replaced
  let allowRemote = false;

  /** A refusal from the API (or no answer at all: status 0), with the API's message in words. */
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function authHeaders(extra) {
    const headers = new Headers(extra || {});
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) headers.set("Authorization", "Bearer " + key);
    return headers;
  }

  /** fetch() that resolves only to a 2xx response and throws ApiError for anything else. */
  async function call(path, init) {
    const options = init || {};
    let response;
    try {
      response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
    } catch (err) {
      throw new ApiError(0, "unreachable", "Could not reach the service (" + err.message + ").");
    }
    if (response.ok) return response;
    throw await errorOf(response);
  }

  async function errorOf(response) {
    let code = "http_" + response.status;
    let message = ("The service answered " + response.status + " " + response.statusText).trim() + ".";
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) {
        code = body.error.code || code;
        message = body.error.message;
      }
    } catch (_) {
      // not the API's JSON error shape (a proxy's page, say): keep the status line
    }
    return new ApiError(response.status, code, message);
  }

  // --- API key -------------------------------------------------------------------------------

  function askForKey(message) {
    sessionStorage.removeItem(KEY_STORE); // a key the service refused is of no further use
    $("key-reason").textContent = sentence(message);
    $("key").hidden = false;
    $("key-input").value = "";
    $("key-input").focus();
  }

  function useKey(event) {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("key").hidden = true;
    if (!modelLoaded) loadModel();
    if (retry) {
      const again = retry;
      retry = null;
      again();
    }
  }

  // --- model card ----------------------------------------------------------------------------

  async function loadModel() {
    try {
      const meta = await (await call("metadata")).json();
      showModel(meta);
      modelLoaded = true;
    } catch (err) {
      if (err.status === 401) {
        $("model-loading").textContent = "The model card needs the API key.";
        askForKey(err.message);
        return;
      }
      $("model-loading").textContent = "Could not load the model card: " + sentence(err.message);
    }
  }

  function showModel(meta) {
    $("model-name").textContent = meta.name;
    $("model-version").textContent = meta.version;
    $("model-precision").textContent = meta.precision || "fp32";
    const attention = meta.attention || (meta.class_activation_maps ? "class_activation_map" : null);
    $("model-attention").textContent = attention ? METHODS[attention] || attention : "none";
    $("model-labels").textContent = meta.labels.length + ": " + meta.labels.join(", ");
    const test = meta.metrics && meta.metrics.test;
    $("model-accuracy").textContent = test ? percent(test.accuracy) : "not evaluated";
    $("model-f1").textContent = test ? test.macro_f1.toFixed(3) : "not evaluated";
    const warning = modelWarning(meta.metrics);
    $("model-warning").textContent = warning || "";
    $("model-warning").hidden = !warning;
    $("model-loading").hidden = true;
    $("model-card").hidden = false;
    allowRemote = Boolean(meta.allow_remote);
    $("url-form").hidden = !allowRemote;
  }

  function modelWarning(metrics) {
    if (!metrics) return "This model carries no metrics: it was never evaluated, so its answers are untested.";
    if (metrics.beats_baseline) return null;
    const val = metrics.val;
    return "Warning: this model does not beat the random-guess baseline (validation macro-F1 " +
      val.macro_f1.toFixed(3) + " against the baseline's " + val.baseline_macro_f1.toFixed(3) + " plus a margin of " +
      metrics.baseline_margin.toFixed(3) + "). Do not rely on its answers.";
  }

  // --- classification ------------------------------------------------------------------------

  /** Classify ``source`` ({file: File} or {url: string}): /predict and /annotate side by side. */
  async function classify(source) {
    const number = ++latest;
    const name = source.file ? source.file.name || "the image" : source.url;
    setState("busy", "Classifying " + name + "…");
    const request = () => source.file
      ? { method: "POST", body: formWith(source.file) }
      : { method: "POST", body: JSON.stringify({ url: source.url }), headers: { "Content-Type": "application/json" } };
    let prediction, picture;
    try {
      [prediction, picture] = await Promise.all([
        call("predict?top_k=" + TOP_K, request()).then((r) => r.json()),
        // The picture is a bonus: its own error (no heatmap for this model, say) keeps the prediction.
        call("annotate", request()).then(
          async (r) => ({ blob: await r.blob(), method: r.headers.get("X-Attention-Method") }),
          (err) => ({ error: err }),
        ),
      ]);
    } catch (err) {
      if (number !== latest) return;
      if (err.status === 401) {
        retry = () => classify(source);
        setState("idle", "Enter the API key to classify " + name + ".");
        askForKey(err.message);
        return;
      }
      showError(err.message);
      return;
    }
    if (number !== latest) return;
    showPrediction(prediction);
    const note = await showPicture(picture, source, prediction.label);
    if (number === latest) setState("done", "Classified " + name + "." + (note ? " " + note : ""));
  }

  function formWith(file) {
    const form = new FormData();
    form.append("image", file, file.name || "image");
    return form;
  }

  function showPrediction(prediction) {
    $("label").textContent = prediction.label;
    $("confidence").textContent = percent(prediction.confidence);
    // Sorted here: a JavaScript object lists integer-like keys ("0", "1", ...) in numeric order.
    const scores = Object.entries(prediction.scores).sort((a, b) => b[1] - a[1]).slice(0, TOP_K);
    $("scores").replaceChildren(...scores.map(([label, p]) => scoreItem(label, p)));
    $("prediction").hidden = false;
  }

  function scoreItem(label, p) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "score-label";
    name.textContent = label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true"); // the number next to it says the same
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = Math.max(0, Math.min(100, p * 100)).toFixed(1) + "%"; // CSSOM: allowed under CSP
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "score-value";
    value.textContent = percent(p);
    item.append(name, bar, value);
    return item;
  }

  /** The annotated PNG; when the service could not draw one, the uploaded image and the reason
   *  (or, for a URL, whose image the page never fetches itself, the reason alone, returned). */
  async function showPicture(picture, source, label) {
    const img = $("annotated");
    if (picture.blob) {
      const method = METHODS[picture.method] || picture.method || "attention";
      setPicture(picture.blob, "The image with the model's " + method + " heatmap and a box where it found " + label);
      $("caption").textContent = "Where the model looked (" + method + "), with a box around the hottest region.";
    } else if (source.file) {
      setPicture(source.file, "The uploaded image");
      $("caption").textContent = "No heatmap: " + sentence(picture.error.message);
    } else {
      $("figure").hidden = true;
      return "No heatmap: " + sentence(picture.error.message);
    }
    $("figure").hidden = false;
    try {
      await img.decode();
    } catch (_) {
      $("caption").textContent = "The browser could not show this image.";
    }
    return null;
  }

  function setPicture(blob, alt) {
    if (pictureUrl) URL.revokeObjectURL(pictureUrl);
    pictureUrl = URL.createObjectURL(blob);
    $("annotated").alt = alt;
    $("annotated").src = pictureUrl;
  }

  function showError(message) {
    setState("error", "Not classified.");
    $("error").textContent = sentence(message);
  }

  /** busy | done | error | idle on #result (tests and styles wait on it), with a status line. */
  function setState(state, status) {
    $("result").dataset.state = state;
    $("status").textContent = status;
    if (state === "busy" || state === "error") { // an old result never stands next to a new error
      $("error").hidden = state === "busy";
      $("prediction").hidden = true;
      $("figure").hidden = true;
    }
  }

  // --- input: chooser, drop zone, URL --------------------------------------------------------

  function onFileChosen() {
    const input = $("file");
    const file = input.files && input.files[0];
    if (file) classify({ file });
    input.value = ""; // choosing the same file again still fires "change"
  }

  function onDrop(event) {
    event.preventDefault();
    $("drop").classList.remove("dragging");
    const file = event.dataTransfer.files && event.dataTransfer.files[0];
    if (file) {
      classify({ file });
      return;
    }
    const link = (event.dataTransfer.getData("text/uri-list") || "").split("\n")[0].trim();
    if (link && allowRemote) {
      $("url-input").value = link;
      classify({ url: link });
    } else if (link) {
      showError("This service does not fetch URLs (it was started without --allow-remote): save the image and " +
        "drop the file instead.");
    } else {
      showError("Nothing to classify was dropped: drop an image file.");
    }
  }

  function onDragOver(event) {
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    $("drop").classList.add("dragging");
  }

  /** An image pasted anywhere but in a text field (a screenshot, an image copied in another app). */
  function onPaste(event) {
    const target = event.target;
    if (target instanceof HTMLInputElement && target.type !== "file") return; // a pasted URL or key is typed in
    const file = event.clipboardData && event.clipboardData.files[0];
    if (file) {
      event.preventDefault();
      classify({ file });
    }
  }

  function onUrl(event) {
    event.preventDefault();
    const url = $("url-input").value.trim();
    if (url) classify({ url });
  }

  function percent(p) {
    return (p * 100).toFixed(1) + " %";
  }

  function sentence(text) {
    const trimmed = String(text).trim();
    return /[.!?]$/.test(trimmed) ? trimmed : trimmed + ".";
  }

  function start() {
    $("file").addEventListener("change", onFileChosen);
    $("drop").addEventListener("dragover", onDragOver);
    $("drop").addEventListener("dragleave", () => $("drop").classList.remove("dragging"));
    $("drop").addEventListener("drop", onDrop);
    // A drop that misses the zone must not navigate away from the page to the dropped file.
    document.addEventListener("dragover", (event) => event.preventDefault());
    document.addEventListener("drop", (event) => event.preventDefault());
    document.addEventListener("paste", onPaste);
    $("url-form").addEventListener("submit", onUrl);
    $("file-form").addEventListener("submit", (event) => event.preventDefault());
    $("key-form").addEventListener("submit", useKey);
    $("result").dataset.state = "idle";
    loadModel();
  }

  start();
})();
