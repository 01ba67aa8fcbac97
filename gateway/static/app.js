// imgpipe web page: the upload form of index.html, enhanced. Without this script the form posts
// to /ui/upload and the server renders the status page; with it, the page uses the JSON API:
// POST /upload, the Server-Sent Events of /requests/{id}/events, and GET /status/{id}.
// Everything that comes from the server or the CSV goes into the page as text (textContent)
// or as a checked URL property, never as HTML: product names are hostile input.
(function () {
  "use strict";

  // The order of the form's multipart fields: options first, the file last (the server needs
  // the options before the CSV's first byte).
  const OPTION_FIELDS = [
    "quality", "format", "effort", "target_ratio", "min_ssim", "scale", "max_width", "max_height",
    "webhook_url",
  ];
  const PAGE_SIZE = 100;
  const FINAL = new Set(["Completed", "Failed", "Cancelled"]);
  const RETRY_MS = 2000;
  // An image in flight at a cancel may still finish, and its result counts with no event
  // (docs/lifecycle.md): the page looks again this often, for this long, after a cancel.
  const LATE_POLL_MS = 2000;
  const LATE_WINDOW_MS = 60000;

  const $ = (id) => document.getElementById(id);
  const form = $("upload-form");
  const fileInput = $("file");
  const dropzone = $("dropzone");
  const progressBar = $("progress");

  let current = null; // {id, source, nextToken, failuresShown, failedTotal, late}
  let afterKey = null; // what to do again once an API key is saved

  // ---- small helpers ----------------------------------------------------------------------

  function el(tag, props, children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children || []) {
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // An absolute http(s) URL, or a path on this site (the gateway's own links are paths when
  // it does not know its public URL); anything else (javascript:, //host) is not a link.
  function webUrl(url) {
    if (typeof url !== "string") return null;
    return /^https?:\/\//i.test(url) || /^\/(?![\/\\])/.test(url) ? url : null;
  }

  function formatBytes(count) {
    if (count < 1000) return `${count} B`;
    let value = count;
    for (const unit of ["kB", "MB", "GB"]) {
      value /= 1000;
      if (value < 1000 || unit === "GB") return `${value.toFixed(1)} ${unit}`;
    }
    return `${count} B`;
  }

  function formatDuration(seconds) {
    const total = Math.max(0, Math.round(seconds));
    if (total < 60) return `${total} s`;
    if (total < 3600) return `${Math.floor(total / 60)} min ${total % 60} s`;
    return `${Math.floor(total / 3600)} h ${Math.floor((total % 3600) / 60)} min`;
  }

  function formatPercent(value) {
    return `${Math.round(value * 10) / 10}%`;
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch (error) {
      return null;
    }
  }

  function show(id, visible) {
    $(id).hidden = !visible;
  }

  // ---- the drop zone ----------------------------------------------------------------------

  function showFile() {
    const file = fileInput.files[0];
    $("file-name").textContent = file ? `${file.name} · ${formatBytes(file.size)}` : "";
    dropzone.classList.toggle("has-file", Boolean(file));
  }

  fileInput.addEventListener("change", showFile);
  for (const type of ["dragenter", "dragover"]) {
    dropzone.addEventListener(type, (event) => {
      event.preventDefault();
      dropzone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "dragend"]) {
    dropzone.addEventListener(type, () => dropzone.classList.remove("dragging"));
  }
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropzone.classList.remove("dragging");
    const files = event.dataTransfer ? event.dataTransfer.files : null;
    if (files && files.length) {
      const one = new DataTransfer(); // one file, even when several are dropped
      one.items.add(files[0]);
      fileInput.files = one.files;
      showFile();
    }
  });
  // A file dropped beside the zone must not make the browser navigate away to open it.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => event.preventDefault());
  }

  // ---- upload -----------------------------------------------------------------------------

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    upload();
  });
  form.addEventListener("input", (event) => event.target.classList.remove("invalid"));

  function setBusy(busy, note) {
    $("submit").disabled = busy;
    $("submit-note").textContent = note || "";
  }

  async function upload() {
    const file = fileInput.files[0];
    if (!file) {
      fileInput.focus();
      return;
    }
    const body = new FormData();
    for (const name of OPTION_FIELDS) {
      const value = form.elements[name].value.trim();
      if (value) body.append(name, value);
    }
    body.append("file", file, file.name);
    reset();
    setBusy(true, "Uploading and checking the CSV…");
    let response;
    try {
      response = await fetch("/upload", {
        method: "POST",
        body,
        headers: { Accept: "application/json" },
      });
    } catch (error) {
      setBusy(false);
      showProblems("The upload did not reach imgpipe", "Check your connection and try again.");
      return;
    }
    const answer = await readJson(response);
    setBusy(false);
    if (response.status === 401 || response.status === 403) {
      askForKey(upload);
    } else if (!response.ok || !answer) {
      showError(answer, response.status);
    } else {
      start(answer.request_id);
      loadRequests(null);
    }
  }

  function reset() {
    if (current && current.source) current.source.close();
    current = null;
    for (const id of ["problems", "progress-card", "results", "failures", "watch-note"]) {
      show(id, false);
    }
    for (const body of document.querySelectorAll("#products tbody, #failures tbody")) {
      body.replaceChildren();
    }
    for (const field of form.querySelectorAll(".invalid")) field.classList.remove("invalid");
  }

  const TITLES = {
    invalid_csv: "The CSV was not accepted",
    invalid_argument: "The upload was not accepted",
    too_large: "The file is too large",
    unsupported_media_type: "The upload was not accepted",
    unavailable: "imgpipe is unavailable",
  };

  function showError(answer, status) {
    const error = (answer && answer.error) || {};
    const code = error.code || "";
    const message = error.message || `The server answered ${status}.`;
    const hint =
      code === "invalid_csv"
        ? "Nothing was stored. Fix these problems in your spreadsheet (row 1 is the header) and upload it again."
        : code === "unavailable"
          ? "A service is down or did not answer in time. Try again in a moment."
          : "";
    const details = Array.isArray(error.details) ? error.details : [];
    for (const detail of details) {
      // An option the server refused names its form field in `column`.
      if (OPTION_FIELDS.includes(detail.column)) form.elements[detail.column].classList.add("invalid");
    }
    showProblems(TITLES[code] || "Something went wrong", message, details, hint);
  }

  function showProblems(title, message, details, hint) {
    $("problems-title").textContent = title;
    $("problems-message").textContent = message;
    $("problems-hint").textContent = hint || "";
    show("problems-hint", Boolean(hint));
    const rows = (details || []).map((detail) =>
      el("tr", {}, [
        el("td", { className: "num", textContent: detail.row == null ? "" : String(detail.row) }),
        el("td", { textContent: detail.column || "" }),
        el("td", { textContent: detail.message || "" }),
      ]),
    );
    $("problems-table").tBodies[0].replaceChildren(...rows);
    show("problems-table", rows.length > 0);
    show("problems", true);
    $("problems").scrollIntoView({ block: "nearest" });
  }

  // ---- live progress ----------------------------------------------------------------------

  function start(requestId) {
    reset();
    current = {
      id: requestId, source: null, nextToken: null, failuresShown: 0, failedTotal: 0, late: false,
    };
    history.replaceState(null, "", `#request=${encodeURIComponent(requestId)}`);
    $("request-id").textContent = requestId;
    $("status-link").href = `/ui/requests/${encodeURIComponent(requestId)}`;
    $("status").textContent = "Pending";
    $("status").className = "badge";
    progressBar.value = 0;
    progressBar.classList.remove("done");
    $("percent").textContent = "0%";
    $("counts").textContent = "";
    $("eta").textContent = "Waiting for the first image…";
    show("download", false);
    show("cancel", true);
    show("progress-card", true);
    $("progress-card").scrollIntoView({ block: "nearest" });
    watch(requestId);
  }

  function watch(requestId) {
    if (!current || current.id !== requestId) return;
    const source = new EventSource(`/requests/${encodeURIComponent(requestId)}/events`);
    current.source = source;
    source.addEventListener("progress", (event) => {
      show("watch-note", false);
      render(JSON.parse(event.data));
    });
    source.addEventListener("final", (event) => {
      source.close(); // the stream ends here; without close() the browser would reconnect
      const state = JSON.parse(event.data);
      render(state);
      finish(state);
    });
    source.addEventListener("error", (event) => {
      if (event.data) {
        // The server's own `error` event: its backend stream broke. The browser reconnects.
        note("Live progress was interrupted; reconnecting…");
      } else if (source.readyState === EventSource.CLOSED) {
        // Not a stream at all (a 401, a 404, a 503): find out why from the status call.
        recover(requestId);
      }
    });
  }

  async function recover(requestId) {
    let response;
    try {
      response = await fetch(`/status/${encodeURIComponent(requestId)}?page_size=1`, {
        headers: { Accept: "application/json" },
      });
    } catch (error) {
      note("imgpipe cannot be reached; retrying…");
      setTimeout(() => watch(requestId), RETRY_MS);
      return;
    }
    const answer = await readJson(response);
    if (response.status === 401 || response.status === 403) {
      askForKey(() => watch(requestId));
    } else if (response.ok && answer) {
      render(answer);
      if (FINAL.has(answer.status)) {
        finish(answer);
      } else {
        setTimeout(() => watch(requestId), RETRY_MS);
      }
    } else if (response.status >= 500) {
      note("imgpipe is unavailable right now; retrying…");
      setTimeout(() => watch(requestId), RETRY_MS);
    } else {
      show("progress-card", false);
      showError(answer, response.status);
    }
  }

  function note(text) {
    $("watch-note").textContent = text;
    show("watch-note", true);
  }

  function setStat(id, text, value) {
    const cell = $(id);
    cell.textContent = text;
    cell.dataset.value = String(value);
  }

  function render(state) {
    if (!current || state.request_id !== current.id) return;
    const progress = state.progress;
    const final = FINAL.has(state.status);
    const processed = progress.images_done + progress.images_failed;
    $("status").textContent = state.status;
    $("status").className = `badge status-${state.status.toLowerCase()}`;
    progressBar.value = progress.percent;
    progressBar.textContent = formatPercent(progress.percent);
    progressBar.classList.toggle("done", final);
    $("percent").textContent = formatPercent(progress.percent);
    $("counts").textContent = `${processed} of ${progress.images_total} images processed`;
    if (final) {
      $("eta").textContent = "Finished";
    } else if (progress.eta_seconds != null) {
      const rate = progress.images_per_second ? ` · ${progress.images_per_second.toFixed(1)} images/s` : "";
      $("eta").textContent = `About ${formatDuration(progress.eta_seconds)} left${rate}`;
    } else {
      $("eta").textContent = "Estimating time left…";
    }
    const before = progress.bytes_in || 0;
    const after = progress.bytes_out || 0;
    const saved = before - after;
    const savedPercent = before ? Math.round((100 * saved) / before) : 0;
    setStat("stat-total", String(progress.images_total), progress.images_total);
    setStat("stat-done", String(progress.images_done), progress.images_done);
    setStat("stat-failed", String(progress.images_failed), progress.images_failed);
    setStat("stat-before", formatBytes(before), before);
    setStat("stat-after", formatBytes(after), after);
    setStat("stat-saved", formatBytes(saved), saved);
    $("stat-saved-percent").textContent = `${savedPercent}%`;
    setStat("stat-ssim", formatSsim(progress.mean_ssim), "");
    current.failedTotal = progress.images_failed;
  }

  function finish(state) {
    show("cancel", false);
    loadRequests(null);
    const csvUrl = webUrl(state.output_csv_url);
    if (csvUrl) {
      $("download").href = csvUrl;
      show("download", true);
    }
    loadProducts(state.request_id, null);
    if (state.status === "Cancelled" && current && current.id === state.request_id && !current.late) {
      current.late = true;
      watchLate(state.request_id, state.progress.images_done);
    }
  }

  // After a cancel: show the results of images that were in flight as they land, without a
  // reload; back to the live stream if the request runs again (a retry from elsewhere).
  function watchLate(requestId, done) {
    const until = Date.now() + LATE_WINDOW_MS;
    const look = async () => {
      if (!current || current.id !== requestId || Date.now() > until) return;
      let answer = null;
      try {
        const response = await fetch(`/status/${encodeURIComponent(requestId)}?page_size=1`, {
          headers: { Accept: "application/json" },
        });
        if (response.ok) answer = await readJson(response);
      } catch (error) {
        // Unreachable for now: the next look tries again.
      }
      if (!current || current.id !== requestId) return;
      if (answer && !FINAL.has(answer.status)) {
        current.late = false;
        render(answer);
        show("cancel", true);
        show("download", false);
        watch(requestId);
        return;
      }
      if (answer && answer.progress.images_done !== done) {
        done = answer.progress.images_done;
        render(answer);
        loadRequests(null);
        loadProducts(requestId, null);
      }
      setTimeout(look, LATE_POLL_MS);
    };
    setTimeout(look, LATE_POLL_MS);
  }

  // ---- cancel -----------------------------------------------------------------------------

  $("cancel").addEventListener("click", () => {
    if (current) cancel(current.id);
  });

  async function cancel(requestId) {
    $("cancel").disabled = true;
    let response;
    try {
      response = await fetch(`/requests/${encodeURIComponent(requestId)}/cancel`, {
        method: "POST",
        headers: { Accept: "application/json" },
      });
    } catch (error) {
      $("cancel").disabled = false;
      note("imgpipe cannot be reached; the request was not cancelled.");
      return;
    }
    const answer = await readJson(response);
    $("cancel").disabled = false;
    if (response.status === 401 || response.status === 403) {
      askForKey(() => cancel(requestId));
    } else if (response.ok && answer) {
      if (current && current.id === requestId && current.source) current.source.close();
      render(answer);
      finish(answer);
    } else {
      note((answer && answer.error && answer.error.message) || "The request was not cancelled.");
    }
  }

  // ---- your requests ----------------------------------------------------------------------

  let requestsToken = null;

  $("more-requests").addEventListener("click", () => {
    if (requestsToken) loadRequests(requestsToken);
  });

  // The caller's requests, newest first. Quietly hidden when the server wants a key: the
  // page asks for one only when the merchant does something.
  async function loadRequests(token) {
    let url = "/requests?page_size=20";
    if (token) url += `&page_token=${encodeURIComponent(token)}`;
    let response;
    try {
      response = await fetch(url, { headers: { Accept: "application/json" } });
    } catch (error) {
      return;
    }
    const page = await readJson(response);
    if (!response.ok || !page) {
      if (!token) show("requests-card", false);
      return;
    }
    const rows = $("requests").tBodies[0];
    if (!token) rows.replaceChildren();
    for (const item of page.requests) rows.append(requestRow(item));
    requestsToken = page.next_page_token;
    show("more-requests", Boolean(requestsToken));
    show("requests-card", rows.children.length > 0);
  }

  function requestRow(item) {
    const link = el("a", { href: `#request=${encodeURIComponent(item.request_id)}` }, [
      el("code", { textContent: item.request_id }),
    ]);
    link.addEventListener("click", (event) => {
      event.preventDefault();
      start(item.request_id);
    });
    const status = String(item.status);
    return el("tr", {}, [
      el("td", {}, [link]),
      el("td", {}, [el("span", { className: `badge status-${status.toLowerCase()}`, textContent: status })]),
      el("td", { textContent: item.created_at || "" }),
      el("td", { className: "num", textContent: `${item.progress.images_done} of ${item.progress.images_total}` }),
    ]);
  }

  // ---- results ----------------------------------------------------------------------------

  $("more").addEventListener("click", () => {
    if (current && current.nextToken) loadProducts(current.id, current.nextToken);
  });

  async function loadProducts(requestId, token) {
    let url = `/status/${encodeURIComponent(requestId)}?page_size=${PAGE_SIZE}`;
    if (token) url += `&page_token=${encodeURIComponent(token)}`;
    $("more").disabled = true;
    let response;
    try {
      response = await fetch(url, { headers: { Accept: "application/json" } });
    } catch (error) {
      note("The products could not be loaded; check your connection.");
      $("more").disabled = false;
      return;
    }
    const page = await readJson(response);
    $("more").disabled = false;
    if (response.status === 401 || response.status === 403) {
      askForKey(() => loadProducts(requestId, token));
      return;
    }
    if (!response.ok || !page) {
      note((page && page.error && page.error.message) || "The products could not be loaded.");
      return;
    }
    if (!current || current.id !== requestId) return;
    const rows = $("products").tBodies[0];
    const failures = $("failures").querySelector("tbody");
    if (!token) {
      // The first page again (a late result after a cancel): the listing starts over.
      rows.replaceChildren();
      failures.replaceChildren();
      current.failuresShown = 0;
    }
    for (const product of page.products) {
      rows.append(productRow(product));
      for (const error of product.errors) failures.append(failureRow(product, error));
      current.failuresShown += product.errors.length;
    }
    current.nextToken = page.next_page_token;
    show("more", Boolean(page.next_page_token));
    show("results", true);
    show("failures", current.failuresShown > 0);
  }

  function productRow(product) {
    const inputs = product.input_image_urls;
    const errors = new Map(product.errors.map((error) => [error.url, error]));
    const pairs = inputs.map((source, index) =>
      pair(product.product_name, index + 1, inputs.length, source, product.output_image_urls[index], errors.get(source)),
    );
    const done = product.output_image_urls.filter(Boolean).length;
    const result = el("td", { className: "result" }, [`${done} of ${inputs.length} compressed`]);
    const saving = productSaving(product);
    if (saving) {
      result.append(el("br"), el("span", { className: "saved", textContent: saving.text, title: saving.title }));
    }
    const kept = productQuality(product);
    if (kept) {
      result.append(el("br"), el("span", { className: "ssim", textContent: kept.text, title: kept.title }));
    }
    const missed = (product.notes || []).filter((note) => note).length;
    if (missed) {
      result.append(el("br"), el("span", { className: "note", textContent: `${missed} target not met` }));
    }
    if (product.errors.length) {
      result.append(el("br"), el("span", { className: "bad", textContent: `${product.errors.length} failed` }));
    }
    return el("tr", {}, [
      el("td", { className: "num", textContent: product.serial_number }),
      el("td", { className: "name", textContent: product.product_name }),
      el("td", {}, [el("div", { className: "pairs" }, pairs)]),
      result,
    ]);
  }

  // The lowest SSIM of the product's done images (1.0 identical; about 0.95 hard to tell apart),
  // with each image's quality and SSIM in the title; as gateway/html_pages.py renders it.
  function productQuality(product) {
    const qualities = product.quality || [];
    const done = (product.ssim || [])
      .map((ssim, i) => [i + 1, ssim])
      .filter(([, ssim]) => typeof ssim === "number");
    if (!done.length) return null;
    const lowest = Math.min(...done.map(([, ssim]) => ssim));
    const title = done
      .map(([i, ssim]) => `image ${i}: quality ${qualities[i - 1] ?? "?"}, SSIM ${ssim.toFixed(4)}`)
      .join("; ");
    return { text: `SSIM ${formatSsim(lowest)}`, title };
  }

  function formatSsim(value) {
    return typeof value === "number" ? value.toFixed(3) : "—";
  }

  // Bytes saved on the product's done images (sizes are null until an image is done).
  function productSaving(product) {
    const sum = (sizes) => (sizes || []).reduce((total, size) => total + (size || 0), 0);
    const before = sum(product.input_bytes);
    const after = sum(product.output_bytes);
    if (!before) return null;
    const percent = Math.round((100 * (before - after)) / before);
    return {
      text: `saved ${formatBytes(before - after)} (${percent}%)`,
      title: `${formatBytes(before)} → ${formatBytes(after)}`,
    };
  }

  function pair(name, index, count, source, output, error) {
    if (error) {
      // A failed source is not shown: it may be no image at all, or a decompression bomb.
      return el("div", { className: "pair failed" }, [failedBox(source, error)]);
    }
    const label = `image ${index} of ${count}, ${name}`;
    const after = webUrl(output)
      ? thumb(output, `After: ${label}`, "after")
      : el("span", { className: "thumb placeholder", textContent: "…" });
    return el("div", { className: "pair" }, [
      thumb(source, `Before: ${label}`, "before"),
      el("span", { className: "arrow", textContent: "→", ariaHidden: "true" }),
      after,
    ]);
  }

  function failedBox(source, error) {
    // The code may break after each "_" (HTTP_STATUS is wider than a thumbnail).
    const parts = error.code.split("_");
    const code = parts.flatMap((part, i) => (i < parts.length - 1 ? [`${part}_`, el("wbr")] : [part]));
    const link = webUrl(source);
    const box = el(link ? "a" : "span", {
      className: "thumb placeholder bad",
      title: `${error.code}: ${error.message}`,
    }, [el("strong", { textContent: "Failed" }), ...code]);
    if (link) Object.assign(box, { href: link, target: "_blank", rel: "noopener noreferrer" });
    return box;
  }

  function thumb(url, alt, kind) {
    const safe = webUrl(url);
    if (!safe) return el("span", { className: "thumb placeholder", title: String(url), textContent: "?" });
    const image = el("img", {
      className: `thumb ${kind}`,
      alt,
      width: 64,
      height: 64,
      loading: "lazy",
      decoding: "async",
      referrerPolicy: "no-referrer",
    });
    image.addEventListener("error", () => {
      image.replaceWith(el("span", { className: "thumb placeholder", title: alt, textContent: "not available" }));
    });
    image.src = safe;
    return el("a", { href: safe, target: "_blank", rel: "noopener noreferrer" }, [image]);
  }

  function failureRow(product, error) {
    return el("tr", {}, [
      el("td", { className: "num", textContent: product.serial_number }),
      el("td", { textContent: product.product_name }),
      el("td", { className: "url", textContent: error.url }),
      el("td", {}, [el("span", { className: "code", textContent: error.code })]),
      el("td", { textContent: error.message }),
    ]);
  }

  // ---- API key ----------------------------------------------------------------------------

  function askForKey(retry) {
    afterKey = retry;
    const panel = $("key-panel");
    panel.open = true;
    $("key-note").textContent = "This imgpipe needs an API key.";
    show("key-note", true);
    panel.scrollIntoView({ block: "nearest" });
    $("key").focus();
  }

  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    let response;
    try {
      response = await fetch("/session", {
        method: "POST",
        body: new URLSearchParams({ key: $("key").value }),
        redirect: "manual", // a redirect means the key was taken, like a 2xx
      });
    } catch (error) {
      $("key-note").textContent = "imgpipe cannot be reached; try again.";
      return;
    }
    if (response.ok || response.type === "opaqueredirect") {
      $("key").value = "";
      show("key-note", false);
      $("key-panel").open = false;
      const retry = afterKey;
      afterKey = null;
      if (retry) retry();
    } else {
      $("key-note").textContent = "This key was not accepted.";
      show("key-note", true);
    }
  });

  // ---- a reloaded page goes on following its request --------------------------------------

  const resumed = /^#request=([^&]+)$/.exec(location.hash);
  if (resumed) start(decodeURIComponent(resumed[1]));
  loadRequests(null);
})();
