/* mkat web interface: one page, plain JavaScript, no build step.
 *
 * Sections, each using only the ones above it:
 *   DOM & escaping    html`` escapes every value unless it is already safe markup
 *   API               api(method, path, body): Basic auth, the error shape as ApiError, 401 → login
 *   Formatting        states, times ("3 min ago"), durations ("5m")
 *   Components        badge, alert item, copyable URL, pagination, field errors, toasts, dialogs
 *   Views             one async function per page, returning { title, body }
 *   Actions           what a [data-action] click or a [data-form] submit does
 *   Router            hash routes → views; a stale answer never overwrites a newer page
 *   Live events       the event stream read through fetch, polling when it is unavailable
 *   Init
 */
"use strict";

/* ===== DOM & escaping ==================================================== */

/** Markup that is already safe to insert (built by html`` or a constant). */
class Safe {
  constructor(markup) { this.markup = markup; }
  toString() { return this.markup; }
}

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

/** Escape text for HTML: element content and quoted attribute values alike. */
function escapeHtml(value) {
  return String(value).replace(/[&<>"']/g, (ch) => ESCAPES[ch]);
}

/** Markup for a value: Safe as is, arrays joined, null/false/undefined empty, the rest escaped. */
function markup(value) {
  if (value instanceof Safe) return value.markup;
  if (Array.isArray(value)) return value.map(markup).join("");
  if (value === null || value === undefined || value === false) return "";
  return escapeHtml(value);
}

/** Tagged template: every interpolation is escaped unless it is Safe. */
function html(strings, ...values) {
  let out = strings[0];
  values.forEach((value, i) => { out += markup(value) + strings[i + 1]; });
  return new Safe(out);
}

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

/** Replace an element's content with markup. */
function mount(element, content) {
  element.innerHTML = markup(content);
}

/* ===== API ================================================================ */

const session = {
  get: () => sessionStorage.getItem("mkat.auth"),
  set: (user, password) => {
    const bytes = new TextEncoder().encode(`${user}:${password}`);
    sessionStorage.setItem("mkat.auth", btoa(String.fromCharCode(...bytes)));
  },
  clear: () => sessionStorage.removeItem("mkat.auth"),
};

/** An error answer from the API: { error, code, details }. */
class ApiError extends Error {
  constructor(status, body) {
    super(body.error || `HTTP ${status}`);
    this.status = status;
    this.code = body.code || "HTTP_ERROR";
    this.details = body.details || {};
  }
}

/** Headers every API call carries: credentials, and the marker that avoids the browser's login box. */
function apiHeaders() {
  const headers = { "X-Requested-With": "mkat-ui", Accept: "application/json" };
  const token = session.get();
  if (token) headers.Authorization = `Basic ${token}`;
  return headers;
}

/** Call the API; resolve to the JSON answer (null for 204), reject with ApiError. A 401 logs out. */
async function api(method, path, body) {
  const headers = apiHeaders();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(`api/v1/${path}`, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, { error: "mkat cannot be reached. Is it running?", code: "NETWORK" });
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (response.status === 401 && !location.hash.startsWith("#/login")) {
    session.clear();
    router.login();
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/** Build a query string from the non-empty entries of an object. */
function query(params) {
  const pairs = Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined);
  return pairs.length ? "?" + new URLSearchParams(pairs).toString() : "";
}

/** Every service (they are paginated by 100): for pickers and counts. */
async function allServices() {
  const services = [];
  for (let page = 1; page <= 50; page++) {
    const answer = await api("GET", `services?pageSize=100&page=${page}`);
    services.push(...answer.items);
    if (!answer.hasNextPage) break;
  }
  return services;
}

/* ===== Formatting ========================================================= */

const STATES = ["Unknown", "Up", "Down", "Paused"];
const SEVERITIES = ["Low", "Medium", "High", "Critical"];
const MONITOR_TYPES = ["Webhook", "Heartbeat"];
const ALERT_TYPES = ["Failure", "Recovery", "Missed heartbeat", "Failed health check"];
const CHANNEL_TYPES = ["Telegram", "Email", "Webhook"];
const STATE_ICONS = ["?", "✓", "✕", "❚❚"];

const absoluteTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
const relativeTime = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

/** "3 min ago" / "in 2 hours" for an ISO time. */
function relative(iso) {
  const seconds = (Date.parse(iso) - Date.now()) / 1000;
  const steps = [[60, "second"], [3600, "minute"], [86400, "hour"], [604800, "day"], [Infinity, "week"]];
  let unit = "second";
  let size = 1;
  for (const [limit, name] of steps) {
    unit = name;
    if (Math.abs(seconds) < limit) break;
    size = limit;
  }
  return relativeTime.format(Math.round(seconds / size), unit);
}

/** A <time> showing the local date and time with a relative hint, or a dash. */
function when(iso, { relativeOnly = false } = {}) {
  if (!iso) return html`<span class="muted">—</span>`;
  const local = absoluteTime.format(new Date(iso));
  if (relativeOnly) return html`<time datetime="${iso}" title="${local}">${relative(iso)}</time>`;
  return html`<time datetime="${iso}" title="${relative(iso)}">${local} <span class="muted">(${relative(iso)})</span></time>`;
}

const UNITS = { s: 1, m: 60, h: 3600, d: 86400, w: 604800 };

/** Seconds in "90s", "5m", "1h", "1d", "1h 30m" or a plain number of seconds; NaN if unreadable. */
function parseDuration(text) {
  const value = String(text).trim().toLowerCase();
  if (/^\d+$/.test(value)) return Number(value);
  const parts = [...value.matchAll(/(\d+)\s*([smhdw])/g)];
  if (!parts.length || parts.map((p) => p[0]).join("").replace(/\s/g, "") !== value.replace(/\s/g, "")) return NaN;
  return parts.reduce((total, [, n, unit]) => total + Number(n) * UNITS[unit], 0);
}

/** "45s", "5m", "1h 30m", "2d". */
function formatDuration(seconds) {
  let rest = Math.max(0, Math.round(seconds));
  const parts = [];
  for (const unit of ["d", "h", "m", "s"]) {
    const size = UNITS[unit];
    if (rest >= size) {
      parts.push(`${Math.floor(rest / size)}${unit}`);
      rest %= size;
    }
  }
  return parts.slice(0, 2).join(" ") || "0s";
}

/** A channel's configuration in a few words. */
function channelTarget(channel) {
  const config = channel.configuration || {};
  if (channel.type === 0) return `chat ${config.chatId}${config.messageThreadId ? `, topic ${config.messageThreadId}` : ""}`;
  if (channel.type === 1) return config.address;
  return config.url;
}

/* ===== Components ========================================================= */

/** A state badge: colour and text, never colour alone. */
function badge(state) {
  const name = STATES[state] || "Unknown";
  return html`<span class="badge state-${name.toLowerCase()}"><span aria-hidden="true">${STATE_ICONS[state]}</span> ${name}</span>`;
}

function severityTag(severity) {
  return html`<span class="tag severity-${severity}">${SEVERITIES[severity]}</span>`;
}

/** One alert: what, when, and what can be done about it. */
function alertItem(alert, { actions = true } = {}) {
  const kind = alert.type === 1 ? "up" : "down";
  const status = [];
  if (alert.suppressed) status.push(html`<span class="tag">muted</span>`);
  if (alert.resolvedAt) status.push(html`<span class="tag">resolved</span>`);
  if (alert.acknowledgedAt) status.push(html`<span class="tag">acknowledged</span>`);
  const canAck = actions && !alert.acknowledgedAt && alert.type !== 1;
  return html`<li class="alert alert-${kind}">
    <div class="alert-main">
      <a href="#/services/${alert.serviceId}" class="alert-service">${alert.serviceName}</a>
      <span class="alert-type">${ALERT_TYPES[alert.type]}</span> ${severityTag(alert.severity)} ${status}
      <p class="alert-message">${alert.message}</p>
      <p class="muted small">${when(alert.createdAt)}</p>
    </div>
    ${actions ? html`<div class="alert-actions">
      ${canAck ? html`<button type="button" data-action="ack" data-id="${alert.id}">Acknowledge</button>` : ""}
      ${alert.type !== 1 && !alert.resolvedAt ? html`<button type="button" data-action="mute" data-id="${alert.serviceId}" data-name="${alert.serviceName}">Mute…</button>` : ""}
    </div>` : ""}
  </li>`;
}

/** A read-only value with a Copy button. */
function copyField(label, value) {
  return html`<div class="copy">
    <label>${label}<input type="text" readonly value="${value}"></label>
    <button type="button" data-action="copy" data-value="${value}">Copy</button>
  </div>`;
}

/** Previous/next page links for a paginated answer; `hrefFor(page)` builds the links. */
function pagination(answer, hrefFor) {
  if (answer.totalPages <= 1) return "";
  return html`<nav class="pages" aria-label="Pages">
    ${answer.hasPreviousPage ? html`<a href="${hrefFor(answer.page - 1)}">← Previous</a>` : html`<span></span>`}
    <span class="muted">Page ${answer.page} of ${answer.totalPages} · ${answer.totalCount} in all</span>
    ${answer.hasNextPage ? html`<a href="${hrefFor(answer.page + 1)}">Next →</a>` : html`<span></span>`}
  </nav>`;
}

/** A placeholder for a field's error messages; filled by showErrors(). */
function errorSlot(field) {
  return html`<p class="field-error" data-error-for="${field}" id="error-${field.replace(/[^\w-]/g, "_")}"></p>`;
}

/** Put the API's validation messages beside their fields; true if any field took one. */
function showErrors(form, details) {
  $$("[data-error-for]", form).forEach((slot) => { slot.textContent = ""; });
  $$("[aria-invalid]", form).forEach((input) => input.removeAttribute("aria-invalid"));
  let shown = false;
  for (const [field, messages] of Object.entries(details || {})) {
    const slot = $$("[data-error-for]", form).find((s) => s.dataset.errorFor === field);
    if (!slot) continue;
    slot.textContent = messages.join("; ");
    const input = $$("[name]", form).find((i) => i.name === field);
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", slot.id);
    }
    shown = true;
  }
  return shown;
}

/** A short message in the corner; errors stay longer. */
function toast(message, kind = "ok") {
  const item = document.createElement("div");
  item.className = `toast toast-${kind}`;
  item.setAttribute("role", kind === "error" ? "alert" : "status");
  item.textContent = message;
  $("#toasts").append(item);
  setTimeout(() => item.remove(), kind === "error" ? 8000 : 4000);
}

/** Report a failed call: field messages in the form when it has a place for them, else a toast. */
function reportError(error, form) {
  if (form && showErrors(form, error.details)) {
    toast("Please correct the highlighted fields.", "error");
  } else {
    const detail = Object.entries(error.details || {}).map(([k, v]) => `${k}: ${v.join(", ")}`).join("; ");
    toast(detail ? `${error.message} (${detail})` : error.message, "error");
  }
}

/* -- dialogs ---------------------------------------------------------------- */

const dialog = {
  /** Show a dialog with this content; its form's submit goes to forms[name]. */
  open(content) {
    const element = $("#dialog");
    mount(element, content);
    element.showModal();
    const first = $("input:not([type=hidden]), select, textarea, button.primary", element);
    if (first) first.focus();
  },
  close() {
    const element = $("#dialog");
    if (element.open) element.close();
  },
  isOpen: () => $("#dialog").open,
};

/** The Cancel and submit buttons at the foot of a dialog's form. */
function dialogButtons(label, kind = "primary") {
  return html`<div class="buttons">
    <button type="button" data-action="close-dialog">Cancel</button>
    <button type="submit" class="${kind}">${label}</button>
  </div>`;
}

let confirmAction = null;

/** Ask before doing something that cannot be undone. */
function confirmThen(message, label, action) {
  confirmAction = action;
  dialog.open(html`<form data-form="confirm" method="dialog">
    <h2 id="dialog-title">Are you sure?</h2>
    <p>${message}</p>
    ${dialogButtons(label, "danger")}
  </form>`);
}

function muteDialog(serviceId, serviceName) {
  dialog.open(html`<form novalidate data-form="mute" data-id="${serviceId}">
    <h2 id="dialog-title">Mute ${serviceName || "service"}</h2>
    <p class="muted">Monitoring goes on and alerts are recorded, but nobody is notified until the mute ends.</p>
    <fieldset>
      <legend>For how long</legend>
      <label class="inline"><input type="radio" name="choice" value="15m" checked> 15 minutes</label>
      <label class="inline"><input type="radio" name="choice" value="1h"> 1 hour</label>
      <label class="inline"><input type="radio" name="choice" value="24h"> 24 hours</label>
      <label class="inline"><input type="radio" name="choice" value="custom"> Other:</label>
      <label class="inline">Duration <input type="text" name="custom" placeholder="e.g. 2h or 3d" size="8"></label>
      ${errorSlot("durationMinutes")}
    </fieldset>
    <label>Reason (optional)<input type="text" name="reason" maxlength="200"></label>
    ${errorSlot("reason")}
    ${dialogButtons("Mute")}
  </form>`);
}

function pauseDialog(serviceId, serviceName) {
  dialog.open(html`<form novalidate data-form="pause" data-id="${serviceId}">
    <h2 id="dialog-title">Pause ${serviceName}</h2>
    <p class="muted">While paused nothing is checked and no alert is made. Pushes are still noted.</p>
    <label>Until (optional, your local time)<input type="datetime-local" name="until"></label>
    ${errorSlot("until")}
    <label class="inline"><input type="checkbox" name="autoResume"> Resume by itself at that time</label>
    ${errorSlot("autoResume")}
    ${dialogButtons("Pause")}
  </form>`);
}

function channelFields(channel) {
  const config = channel ? channel.configuration : {};
  const type = channel ? channel.type : 0;
  return html`
    <div data-kind="0" ${type === 0 ? "" : new Safe("hidden")}>
      <label>Chat id<input type="text" name="configuration.chatId" value="${config.chatId || ""}" placeholder="-1001234567890"></label>
      ${errorSlot("configuration.chatId")}
      <label>Topic id (optional, for a forum group)<input type="text" name="configuration.messageThreadId" inputmode="numeric" value="${config.messageThreadId || ""}"></label>
      ${errorSlot("configuration.messageThreadId")}
    </div>
    <div data-kind="1" ${type === 1 ? "" : new Safe("hidden")}>
      <label>E-mail address<input type="email" name="configuration.address" value="${config.address || ""}"></label>
      ${errorSlot("configuration.address")}
    </div>
    <div data-kind="2" ${type === 2 ? "" : new Safe("hidden")}>
      <label>URL that receives a JSON POST<input type="url" name="configuration.url" value="${config.url || ""}" placeholder="https://"></label>
      ${errorSlot("configuration.url")}
    </div>`;
}

function channelDialog(contactId, channel) {
  dialog.open(html`<form novalidate data-form="channel" data-contact="${contactId}" data-id="${channel ? channel.id : ""}">
    <h2 id="dialog-title">${channel ? "Edit channel" : "Add a channel"}</h2>
    <label>Type
      <select name="type" data-change="channel-type" ${channel ? new Safe("disabled") : ""}>
        ${CHANNEL_TYPES.map((name, i) => html`<option value="${i}" ${channel && channel.type === i ? new Safe("selected") : ""}>${name}</option>`)}
      </select>
    </label>
    ${errorSlot("type")}
    ${channelFields(channel)}
    <label class="inline"><input type="checkbox" name="isEnabled" ${!channel || channel.isEnabled ? new Safe("checked") : ""}> Enabled</label>
    ${dialogButtons(channel ? "Save" : "Add channel")}
  </form>`);
}

function renameDialog(contact) {
  dialog.open(html`<form novalidate data-form="rename-contact" data-id="${contact.id}">
    <h2 id="dialog-title">Rename contact</h2>
    <label>Name<input type="text" name="name" value="${contact.name}" required maxlength="100"></label>
    ${errorSlot("name")}
    ${dialogButtons("Save")}
  </form>`);
}

/* ===== Views ============================================================== */

/* Each view: async (params, query) → { title, body, live }. `live` views are redrawn when an
 * event arrives; views with forms are not, so nothing typed is lost. */

function viewLogin() {
  return {
    title: "Log in",
    bare: true,
    body: html`<section class="login">
      <h1>mkat</h1>
      <p class="muted">Is my stuff still working? Log in to see.</p>
      <form data-form="login">
        <label>User name<input type="text" name="user" autocomplete="username" value="admin" required></label>
        <label>Password<input type="password" name="password" autocomplete="current-password" required></label>
        <p class="field-error" id="login-error" role="alert"></p>
        <button type="submit" class="primary">Log in</button>
      </form>
      <p class="muted small">The password is in mkat's log (<code>event=generated_password</code>) unless you set <code>MKAT_PASSWORD</code>.</p>
    </section>`,
  };
}

async function viewDashboard() {
  const counts = await Promise.all(STATES.map((_, state) => api("GET", `services?state=${state}&pageSize=1`)));
  const total = counts.reduce((sum, answer) => sum + answer.totalCount, 0);
  if (total === 0) return { title: "Dashboard", live: true, body: firstSteps() };
  const [down, open, recent, channels] = await Promise.all([
    api("GET", "services?state=2&pageSize=100"),
    api("GET", "alerts?acknowledged=false&pageSize=50"),
    api("GET", "alerts?pageSize=10"),
    api("GET", "channels"),
  ]);
  const active = open.items.filter((alert) => alert.type !== 1 && !alert.resolvedAt);
  return {
    title: "Dashboard",
    live: true,
    body: html`<h1>Dashboard</h1>
      ${channels.some((c) => c.isEnabled) ? "" : html`<p class="hint">Nobody is told when something breaks yet.
        <a href="#/contacts">Add a Telegram channel</a> (or an e-mail address, or a webhook) to a contact.</p>`}
      <ul class="counts" aria-label="Services by state">
        ${counts.map((answer, state) => html`<li><a href="#/services?state=${state}">${badge(state)} <strong>${answer.totalCount}</strong></a></li>`)}
      </ul>
      <section aria-labelledby="down-title">
        <h2 id="down-title">Down now</h2>
        ${down.items.length
          ? html`<ul class="cards">${down.items.map(serviceCard)}</ul>`
          : html`<p class="empty">Nothing is down. 🎉</p>`}
      </section>
      <section aria-labelledby="active-title">
        <h2 id="active-title">Alerts waiting for someone</h2>
        ${active.length
          ? html`<ul class="alerts">${active.map((a) => alertItem(a))}</ul>`
          : html`<p class="empty">No unacknowledged alerts.</p>`}
      </section>
      <section aria-labelledby="recent-title">
        <h2 id="recent-title">Recent events</h2>
        ${recent.items.length
          ? html`<ul class="alerts compact">${recent.items.map((a) => alertItem(a, { actions: false }))}</ul>`
          : html`<p class="empty">No alerts yet: services change state when their monitors report.</p>`}
        <p><a href="#/alerts">All alerts →</a></p>
      </section>`,
  };
}

function firstSteps() {
  return html`<h1>Welcome to mkat</h1>
    <section class="welcome">
      <p>mkat watches your services through the pings they send it, and tells you when one stops or fails.</p>
      <ol>
        <li><strong>Create your first service</strong> with a heartbeat monitor: mkat expects a ping at least every interval.</li>
        <li>Add the ping to your cron job or script: mkat shows a ready-to-paste <code>curl</code> line.</li>
        <li>Add a Telegram chat, an e-mail address or a webhook to a contact, so someone hears about it.</li>
      </ol>
      <p><a class="button primary" href="#/services/new">Create your first service</a>
         <a class="button" href="#/contacts">Set up contacts</a></p>
    </section>`;
}

function serviceCard(service) {
  return html`<li class="card">
    <a href="#/services/${service.id}" class="card-title">${service.name}</a> ${badge(service.state)}
    <p class="muted small">${STATES[service.state]} since ${when(service.stateChangedAt, { relativeOnly: true })}
      ${service.mutedUntil ? html` · muted until ${when(service.mutedUntil, { relativeOnly: true })}` : ""}</p>
  </li>`;
}

async function viewServices(_, params) {
  const page = Number(params.get("page")) || 1;
  const search = params.get("search") || "";
  const state = params.get("state") ?? "";
  const answer = await api("GET", `services${query({ page, pageSize: 20, search, state })}`);
  const hrefFor = (n) => `#/services${query({ search, state, page: n })}`;
  let list;
  if (answer.items.length) {
    list = html`<table class="list">
      <thead><tr><th scope="col">Service</th><th scope="col">State</th><th scope="col">Severity</th><th scope="col">Monitors</th><th scope="col">Since</th></tr></thead>
      <tbody>${answer.items.map((s) => html`<tr>
        <td data-label="Service"><a href="#/services/${s.id}">${s.name}</a>${s.mutedUntil ? html` <span class="tag">muted</span>` : ""}</td>
        <td data-label="State">${badge(s.state)}</td>
        <td data-label="Severity">${severityTag(s.severity)}</td>
        <td data-label="Monitors">${s.monitors.map((m) => MONITOR_TYPES[m.type] || "?").join(", ")}</td>
        <td data-label="Since">${when(s.stateChangedAt, { relativeOnly: true })}</td>
      </tr>`)}</tbody>
    </table>`;
  } else if (search || state !== "") {
    list = html`<p class="empty">No service matches. <a href="#/services">Show all</a></p>`;
  } else {
    list = html`<p class="empty">No services yet. <a href="#/services/new">Create your first service</a>.</p>`;
  }
  return {
    title: "Services",
    live: true,
    body: html`<div class="title-row"><h1>Services</h1><a class="button primary" href="#/services/new">New service</a></div>
      <form class="filters" data-form="filter-services" role="search">
        <label>Search<input type="search" name="search" id="services-search" value="${search}" placeholder="name"></label>
        <label>State<select name="state" data-change="submit">
          <option value="">any</option>
          ${STATES.map((name, i) => html`<option value="${i}" ${String(i) === state ? new Safe("selected") : ""}>${name}</option>`)}
        </select></label>
        <button type="submit">Filter</button>
      </form>
      ${list}
      ${pagination(answer, hrefFor)}`,
  };
}

/** A monitor's push URLs, timing and a ready-to-paste curl line. */
function monitorBlock(monitor) {
  const urls = monitor.type === 1
    ? [copyField("Heartbeat URL", monitor.heartbeatUrl),
       copyField("Add to the end of your job", `curl -fsS -m 10 --retry 3 -X POST ${monitor.heartbeatUrl}`)]
    : [copyField("Fail URL", monitor.webhookFailUrl),
       copyField("Recover URL", monitor.webhookRecoverUrl),
       copyField("When it fails, run", `curl -fsS -m 10 --retry 3 -X POST ${monitor.webhookFailUrl}`)];
  const timing = monitor.type === 1
    ? html`<dl class="facts">
        <dt>Expected every</dt><dd>${formatDuration(monitor.intervalSeconds)} (+${formatDuration(monitor.gracePeriodSeconds)} grace)</dd>
        <dt>Last check-in</dt><dd>${when(monitor.lastCheckIn)}</dd>
        <dt>Next deadline</dt><dd>${when(monitor.nextExpectedBefore)}</dd>
      </dl>`
    : html`<dl class="facts"><dt>Last report</dt><dd>${when(monitor.lastCheckIn)}</dd></dl>`;
  return html`<li class="monitor">
    <h3>${MONITOR_TYPES[monitor.type]} monitor ${badge(monitor.state)}</h3>
    ${timing}
    ${urls}
  </li>`;
}

async function viewService([id]) {
  const [service, alerts, contacts] = await Promise.all([
    api("GET", `services/${id}`),
    api("GET", `alerts${query({ serviceId: id, pageSize: 20 })}`),
    api("GET", `services/${id}/contacts`),
  ]);
  const paused = service.state === 3;
  const muted = service.mutedUntil && Date.parse(service.mutedUntil) > Date.now();
  return {
    title: service.name,
    live: true,
    body: html`<div class="title-row">
        <h1><span class="name">${service.name}</span> ${badge(service.state)}</h1>
        <div class="buttons">
          <a class="button" href="#/services/${id}/edit">Edit</a>
          ${paused
            ? html`<button type="button" data-action="resume" data-id="${id}">Resume</button>`
            : html`<button type="button" data-action="pause" data-id="${id}" data-name="${service.name}">Pause…</button>`}
          ${muted
            ? html`<button type="button" data-action="unmute" data-id="${id}">Unmute</button>`
            : html`<button type="button" data-action="mute" data-id="${id}" data-name="${service.name}">Mute…</button>`}
          <button type="button" class="danger" data-action="delete-service" data-id="${id}" data-name="${service.name}">Delete</button>
        </div>
      </div>
      ${service.description ? html`<p class="description">${service.description}</p>` : ""}
      <dl class="facts">
        <dt>Severity</dt><dd>${severityTag(service.severity)}</dd>
        <dt>${STATES[service.state]} since</dt><dd>${when(service.stateChangedAt)}</dd>
        ${paused && service.pausedUntil ? html`<dt>Paused until</dt><dd>${when(service.pausedUntil)}${service.autoResume ? " (resumes by itself)" : ""}</dd>` : ""}
        ${muted ? html`<dt>Muted until</dt><dd>${when(service.mutedUntil)}${service.muteReason ? html` · ${service.muteReason}` : ""}</dd>` : ""}
        <dt>Notifies</dt><dd>${contacts.map((c, i) => html`${i ? ", " : ""}<a href="#/contacts">${c.name}</a>`)}
          <button type="button" class="link" data-action="edit-routes" data-id="${id}">change</button></dd>
      </dl>
      <section aria-labelledby="monitors-title">
        <h2 id="monitors-title">Monitors</h2>
        <ul class="monitors">${service.monitors.map(monitorBlock)}</ul>
      </section>
      <section aria-labelledby="history-title">
        <h2 id="history-title">Alert history</h2>
        ${alerts.items.length
          ? html`<ul class="alerts">${alerts.items.map((a) => alertItem(a))}</ul>`
          : html`<p class="empty">No alerts yet.</p>`}
      </section>`,
  };
}

function monitorRow(monitor, index, count) {
  const type = monitor ? monitor.type : 1;
  return html`<fieldset class="monitor-row" data-monitor="${index}" data-id="${monitor && monitor.id ? monitor.id : ""}">
    <legend>Monitor ${index + 1}</legend>
    <label>Type
      <select name="monitors[${index}].type" ${monitor && monitor.id ? new Safe("disabled") : ""} data-change="monitor-type">
        ${MONITOR_TYPES.map((name, i) => html`<option value="${i}" ${i === type ? new Safe("selected") : ""}>${name}${i === 1 ? " (expects a ping)" : " (told when it fails)"}</option>`)}
      </select>
    </label>
    ${errorSlot(`monitors[${index}].type`)}
    <div class="timing" ${type === 1 ? "" : new Safe("hidden")}>
      <label>Expect a ping every<input type="text" name="monitors[${index}].intervalSeconds" value="${monitor ? formatDuration(monitor.intervalSeconds) : "1h"}" placeholder="5m, 1h, 1d"></label>
      ${errorSlot(`monitors[${index}].intervalSeconds`)}
      <label>Grace period<input type="text" name="monitors[${index}].gracePeriodSeconds" value="${monitor && monitor.id ? formatDuration(monitor.gracePeriodSeconds) : ""}" placeholder="default: a tenth, at least 1m"></label>
      ${errorSlot(`monitors[${index}].gracePeriodSeconds`)}
    </div>
    ${count > 1 ? html`<button type="button" class="link danger" data-action="remove-monitor" data-index="${index}">Remove this monitor</button>` : ""}
  </fieldset>`;
}

/** The service form's monitors, kept in memory while the form is open. */
let draftMonitors = [];

function monitorRows() {
  return html`${draftMonitors.map((m, i) => monitorRow(m, i, draftMonitors.length))}
    ${errorSlot("monitors")}`;
}

async function viewServiceForm([id]) {
  const service = id ? await api("GET", `services/${id}`) : null;
  draftMonitors = service ? service.monitors.map((m) => ({ ...m })) : [null];
  return {
    title: service ? `Edit ${service.name}` : "New service",
    live: false,
    body: html`<h1>${service ? html`Edit <span class="name">${service.name}</span>` : "New service"}</h1>
      <form data-form="service" data-id="${id || ""}" class="stack" novalidate>
        <label>Name<input type="text" name="name" value="${service ? service.name : ""}" required maxlength="100" autocomplete="off"></label>
        ${errorSlot("name")}
        <label>Description (optional)<textarea name="description" maxlength="500" rows="2">${service && service.description ? service.description : ""}</textarea></label>
        ${errorSlot("description")}
        <label>Severity<select name="severity">
          ${SEVERITIES.map((name, i) => html`<option value="${i}" ${(service ? service.severity : 1) === i ? new Safe("selected") : ""}>${name}</option>`)}
        </select></label>
        ${errorSlot("severity")}
        <div id="monitor-rows">${monitorRows()}</div>
        <button type="button" data-action="add-monitor">Add another monitor</button>
        <div class="buttons">
          <a class="button" href="${service ? `#/services/${id}` : "#/services"}">Cancel</a>
          <button type="submit" class="primary">${service ? "Save" : "Create service"}</button>
        </div>
      </form>`,
  };
}

async function viewAlerts(_, params) {
  const filters = {
    serviceId: params.get("serviceId") || "",
    type: params.get("type") || "",
    acknowledged: params.get("acknowledged") || "",
    suppressed: params.get("suppressed") || "",
  };
  const page = Number(params.get("page")) || 1;
  const [answer, services] = await Promise.all([
    api("GET", `alerts${query({ ...filters, page, pageSize: 25 })}`),
    allServices(),
  ]);
  const choice = (name, value, label) => html`<option value="${value}" ${filters[name] === value ? new Safe("selected") : ""}>${label}</option>`;
  return {
    title: "Alerts",
    live: true,
    body: html`<h1>Alerts</h1>
      <form class="filters" data-form="filter-alerts">
        <label>Service<select name="serviceId" data-change="submit">${choice("serviceId", "", "any")}${services.map((s) => choice("serviceId", s.id, s.name))}</select></label>
        <label>Type<select name="type" data-change="submit">${choice("type", "", "any")}${ALERT_TYPES.slice(0, 3).map((name, i) => choice("type", String(i), name))}</select></label>
        <label>Acknowledged<select name="acknowledged" data-change="submit">${choice("acknowledged", "", "either")}${choice("acknowledged", "true", "yes")}${choice("acknowledged", "false", "no")}</select></label>
        <label>Muted<select name="suppressed" data-change="submit">${choice("suppressed", "", "either")}${choice("suppressed", "true", "yes")}${choice("suppressed", "false", "no")}</select></label>
      </form>
      ${answer.items.length
        ? html`<ul class="alerts">${answer.items.map((a) => alertItem(a))}</ul>`
        : html`<p class="empty">No alerts${Object.values(filters).some(Boolean) ? " match" : " yet: they appear when a service goes down or comes back"}.</p>`}
      ${pagination(answer, (n) => `#/alerts${query({ ...filters, page: n })}`)}`,
  };
}

function channelItem(contact, channel) {
  return html`<li class="channel ${channel.isEnabled ? "" : "disabled"}">
    <div>
      <strong>${CHANNEL_TYPES[channel.type]}</strong> <span class="target">${channelTarget(channel)}</span>
      ${channel.isEnabled ? "" : html`<span class="tag">disabled</span>`}
      ${channel.lastError ? html`<p class="channel-error">Last problem: ${channel.lastError} <span class="muted">${when(channel.lastErrorAt, { relativeOnly: true })}</span></p>` : ""}
    </div>
    <div class="buttons">
      <button type="button" data-action="test-channel" data-id="${channel.id}">Test</button>
      <button type="button" data-action="toggle-channel" data-id="${channel.id}" data-enabled="${channel.isEnabled}">${channel.isEnabled ? "Disable" : "Enable"}</button>
      <button type="button" data-action="edit-channel" data-contact="${contact.id}" data-id="${channel.id}">Edit</button>
      <button type="button" class="danger" data-action="delete-channel" data-contact="${contact.id}" data-id="${channel.id}">Delete</button>
    </div>
  </li>`;
}

let knownContacts = [];

async function viewContacts() {
  const [contacts, services] = await Promise.all([api("GET", "contacts"), allServices()]);
  knownContacts = contacts;
  const usedBy = (contact) => services.filter((s) => s.contactIds.includes(contact.id));
  return {
    title: "Contacts",
    live: true,
    body: html`<h1>Contacts</h1>
      <p class="muted">A contact is someone to tell; its channels are how. Each service notifies its contacts on every enabled channel.</p>
      <form novalidate data-form="new-contact" class="inline-form">
        <label>New contact<input type="text" name="name" placeholder="e.g. ops team" required maxlength="100"></label>
        <button type="submit">Add contact</button>
        ${errorSlot("name")}
      </form>
      <ul class="contacts">${contacts.map((contact) => {
        const users = usedBy(contact);
        return html`<li class="contact">
          <div class="title-row">
            <h2>${contact.name} ${contact.isDefault ? html`<span class="tag">default</span>` : ""}</h2>
            <div class="buttons">
              <button type="button" data-action="add-channel" data-id="${contact.id}">Add channel</button>
              <button type="button" data-action="rename-contact" data-id="${contact.id}">Rename</button>
              ${contact.isDefault ? "" : html`<button type="button" class="danger" data-action="delete-contact" data-id="${contact.id}" data-name="${contact.name}">Delete</button>`}
            </div>
          </div>
          ${contact.channels.length
            ? html`<ul class="channels">${contact.channels.map((ch) => channelItem(contact, ch))}</ul>`
            : html`<p class="empty">No channel yet: <button type="button" class="link" data-action="add-channel" data-id="${contact.id}">add a Telegram channel</button>, an e-mail address or a webhook.</p>`}
          <p class="muted small">${users.length
            ? html`Notified for: ${users.map((s, i) => html`${i ? ", " : ""}<a href="#/services/${s.id}">${s.name}</a>`)}`
            : contact.isDefault ? "New services notify this contact." : "No service notifies this contact yet."}</p>
        </li>`;
      })}</ul>`,
  };
}

async function routesDialog(serviceId) {
  const [contacts, current] = await Promise.all([api("GET", "contacts"), api("GET", `services/${serviceId}/contacts`)]);
  const chosen = new Set(current.map((c) => c.id));
  dialog.open(html`<form novalidate data-form="routes" data-id="${serviceId}">
    <h2 id="dialog-title">Who is notified</h2>
    <fieldset><legend>Contacts (at least one)</legend>
      ${contacts.map((c) => html`<label class="inline"><input type="checkbox" name="contactIds" value="${c.id}" ${chosen.has(c.id) ? new Safe("checked") : ""}> ${c.name}</label>`)}
    </fieldset>
    ${errorSlot("contactIds")}
    ${dialogButtons("Save")}
  </form>`);
}

/* ===== Actions ============================================================ */

/** Re-read a form's monitor rows into draftMonitors (so adding or removing a row keeps what was typed). */
function readMonitorRows(form) {
  draftMonitors = $$("[data-monitor]", form).map((row) => {
    const field = (name) => $(`[name$="].${name}"]`, row);
    return {
      id: row.dataset.id || null,
      type: Number(field("type").value),
      intervalText: field("intervalSeconds").value,
      graceText: field("gracePeriodSeconds").value,
    };
  });
}

function redrawMonitorRows(form) {
  mount($("#monitor-rows", form), html`${draftMonitors.map((m, i) => monitorRow(m && {
    ...m, intervalSeconds: parseDuration(m.intervalText), gracePeriodSeconds: parseDuration(m.graceText),
  }, i, draftMonitors.length))}${errorSlot("monitors")}`);
  $$("[data-monitor]", form).forEach((row, i) => {
    const draft = draftMonitors[i];
    if (!draft) return;
    $(`[name$="].intervalSeconds"]`, row).value = draft.intervalText;
    $(`[name$="].gracePeriodSeconds"]`, row).value = draft.graceText;
  });
}

const actions = {
  logout() {
    session.clear();
    events.stop();
    router.login();
  },
  "close-dialog": () => dialog.close(),
  async copy(button) {
    const value = button.dataset.value;
    try {
      await navigator.clipboard.writeText(value);
    } catch {
      const input = button.parentElement.querySelector("input");
      input.select();
      document.execCommand("copy");
    }
    button.textContent = "Copied ✓";
    setTimeout(() => { button.textContent = "Copy"; }, 2000);
  },
  async ack(button) {
    await api("POST", `alerts/${button.dataset.id}/ack`);
    toast("Alert acknowledged.");
    router.refresh();
  },
  mute: (button) => muteDialog(button.dataset.id, button.dataset.name),
  pause: (button) => pauseDialog(button.dataset.id, button.dataset.name),
  async resume(button) {
    await api("POST", `services/${button.dataset.id}/resume`);
    toast("Resumed: every monitor starts again from Unknown.");
    router.refresh();
  },
  async unmute(button) {
    await api("DELETE", `services/${button.dataset.id}/mute`);
    toast("Unmuted.");
    router.refresh();
  },
  "delete-service": (button) => confirmThen(
    `Delete “${button.dataset.name}” with its monitors and alert history? Its push URLs stop working.`,
    "Delete service",
    async () => {
      await api("DELETE", `services/${button.dataset.id}`);
      toast("Service deleted.");
      location.hash = "#/services";
    },
  ),
  "edit-routes": (button) => routesDialog(button.dataset.id),
  "add-monitor"(button) {
    const form = button.closest("form");
    readMonitorRows(form);
    draftMonitors.push({ id: null, type: 1, intervalText: "1h", graceText: "" });
    redrawMonitorRows(form);
    $$("[data-monitor]", form).at(-1).querySelector("select").focus();
  },
  "remove-monitor"(button) {
    const form = button.closest("form");
    readMonitorRows(form);
    draftMonitors.splice(Number(button.dataset.index), 1);
    redrawMonitorRows(form);
  },
  "add-channel": (button) => channelDialog(button.dataset.id, null),
  "edit-channel"(button) {
    const contact = knownContacts.find((c) => c.id === button.dataset.contact);
    channelDialog(contact.id, contact.channels.find((ch) => ch.id === button.dataset.id));
  },
  async "test-channel"(button) {
    button.disabled = true;
    try {
      const result = await api("POST", `channels/${button.dataset.id}/test`);
      toast(result.success ? "Test message sent." : `The test failed: ${result.message}`, result.success ? "ok" : "error");
    } finally {
      router.refresh();
    }
  },
  async "toggle-channel"(button) {
    const enable = button.dataset.enabled !== "true";
    await api("PUT", `channels/${button.dataset.id}`, { isEnabled: enable });
    toast(enable ? "Channel enabled." : "Channel disabled: it gets nothing until enabled again.");
    router.refresh();
  },
  "delete-channel": (button) => confirmThen("Delete this channel? Messages still waiting for it are dropped.", "Delete channel", async () => {
    await api("DELETE", `contacts/${button.dataset.contact}/channels/${button.dataset.id}`);
    toast("Channel deleted.");
    router.refresh();
  }),
  "rename-contact": (button) => renameDialog(knownContacts.find((c) => c.id === button.dataset.id)),
  "delete-contact": (button) => confirmThen(`Delete the contact “${button.dataset.name}” and its channels?`, "Delete contact", async () => {
    await api("DELETE", `contacts/${button.dataset.id}`);
    toast("Contact deleted.");
    router.refresh();
  }),
};

/** What a change in a [data-change] control does. */
const changes = {
  submit: (control) => control.form.requestSubmit(),
  "channel-type"(select) {
    $$("[data-kind]", select.form).forEach((group) => { group.hidden = group.dataset.kind !== select.value; });
  },
  "monitor-type"(select) {
    select.closest("[data-monitor]").querySelector(".timing").hidden = select.value !== "1";
  },
};

/** A duration field's seconds, or an error message for it. */
function durationField(value, { optional = false } = {}) {
  if (optional && !value.trim()) return { seconds: undefined };
  const seconds = parseDuration(value);
  if (!Number.isFinite(seconds) || seconds <= 0) return { error: "Use a duration like 90s, 5m, 1h or 1d." };
  return { seconds };
}

/** The monitor specs of the service form, with client-side duration errors keyed like the API's. */
function monitorSpecs(form) {
  readMonitorRows(form);
  const errors = {};
  const specs = draftMonitors.map((m, i) => {
    const spec = { type: m.type };
    if (m.type === 1) {
      const interval = durationField(m.intervalText);
      const grace = durationField(m.graceText, { optional: true });
      if (interval.error) errors[`monitors[${i}].intervalSeconds`] = [interval.error];
      if (grace.error) errors[`monitors[${i}].gracePeriodSeconds`] = [grace.error];
      spec.intervalSeconds = interval.seconds;
      if (grace.seconds !== undefined) spec.gracePeriodSeconds = grace.seconds;
    }
    return { id: m.id, spec };
  });
  return { specs, errors };
}

/** Save an existing service: its fields, then each monitor added, changed or removed. */
async function saveService(form, id, fields, specs) {
  const before = await api("GET", `services/${id}`);
  await api("PUT", `services/${id}`, fields);
  const kept = new Set(specs.map((s) => s.id).filter(Boolean));
  for (const [i, { id: monitorId, spec }] of specs.entries()) {
    try {
      if (!monitorId) {
        await api("POST", `services/${id}/monitors`, spec);
      } else if (spec.type === 1) {
        const { type, ...timing } = spec;
        await api("PUT", `services/${id}/monitors/${monitorId}`, timing);
      }
    } catch (error) {
      if (error.code === "VALIDATION_ERROR") {
        error.details = Object.fromEntries(Object.entries(error.details).map(([k, v]) => [`monitors[${i}].${k}`, v]));
      }
      throw error;
    }
  }
  for (const monitor of before.monitors) {
    if (!kept.has(monitor.id)) await api("DELETE", `services/${id}/monitors/${monitor.id}`);
  }
}

/* An error a handler does not catch goes to reportError(error, form) in the submit listener. */
const forms = {
  async login(form) {
    session.set(form.elements.user.value, form.elements.password.value);
    try {
      await api("GET", "services?pageSize=1");
    } catch (error) {
      session.clear();
      $("#login-error").textContent = error.status === 401 ? "Wrong user name or password." : error.message;
      form.elements.password.select();
      return;
    }
    events.start();
    router.go(router.afterLogin || "#/");
  },
  async confirm() {
    const action = confirmAction;
    dialog.close();
    if (action) await action();
  },
  async service(form) {
    const id = form.dataset.id;
    const fields = {
      name: form.elements.name.value,
      description: form.elements.description.value.trim() || null,
      severity: Number(form.elements.severity.value),
    };
    const { specs, errors } = monitorSpecs(form);
    showErrors(form, errors); // clears what an earlier attempt showed
    if (Object.keys(errors).length) {
      toast("Please correct the highlighted fields.", "error");
      return;
    }
    if (id) {
      await saveService(form, id, fields, specs);
      toast("Saved.");
      router.go(`#/services/${id}`);
    } else {
      const created = await api("POST", "services", { ...fields, monitors: specs.map((s) => s.spec) });
      toast("Service created. Point your job at its push URL.");
      router.go(`#/services/${created.id}`);
    }
  },
  async mute(form) {
    const choice = form.elements.choice.value;
    const seconds = choice === "custom" ? parseDuration(form.elements.custom.value) : parseDuration(choice);
    if (!Number.isFinite(seconds) || seconds < 60) {
      showErrors(form, { durationMinutes: ["Use a duration like 30m, 2h or 3d."] });
      return;
    }
    const answer = await api("POST", `services/${form.dataset.id}/mute`, {
      durationMinutes: Math.round(seconds / 60), reason: form.elements.reason.value.trim() || null,
    });
    dialog.close();
    toast(`Muted until ${absoluteTime.format(new Date(answer.until))}.`);
    router.refresh();
  },
  async pause(form) {
    const body = { autoResume: form.elements.autoResume.checked };
    if (form.elements.until.value) body.until = new Date(form.elements.until.value).toISOString();
    await api("POST", `services/${form.dataset.id}/pause`, body);
    dialog.close();
    toast(body.until ? `Paused until ${absoluteTime.format(new Date(body.until))}.` : "Paused until you resume it.");
    router.refresh();
  },
  async routes(form) {
    const contactIds = $$("[name=contactIds]:checked", form).map((box) => box.value);
    await api("PUT", `services/${form.dataset.id}/contacts`, { contactIds });
    dialog.close();
    toast("Saved.");
    router.refresh();
  },
  async "new-contact"(form) {
    await api("POST", "contacts", { name: form.elements.name.value });
    toast("Contact added. Give it a channel.");
    router.refresh();
  },
  async "rename-contact"(form) {
    await api("PUT", `contacts/${form.dataset.id}`, { name: form.elements.name.value });
    dialog.close();
    router.refresh();
  },
  async channel(form) {
    const type = Number(form.elements.type.value);
    const value = (name) => form.elements[`configuration.${name}`].value.trim();
    const configuration = [
      () => ({ chatId: value("chatId"), ...(value("messageThreadId") ? { messageThreadId: Number(value("messageThreadId")) } : {}) }),
      () => ({ address: value("address") }),
      () => ({ url: value("url") }),
    ][type]();
    const isEnabled = form.elements.isEnabled.checked;
    if (form.dataset.id) {
      await api("PUT", `contacts/${form.dataset.contact}/channels/${form.dataset.id}`, { configuration, isEnabled });
    } else {
      await api("POST", `contacts/${form.dataset.contact}/channels`, { type, configuration, isEnabled });
    }
    dialog.close();
    toast(form.dataset.id ? "Channel saved." : "Channel added. Use Test to check it.");
    router.refresh();
  },
  "filter-services"(form) {
    router.go(`#/services${query({ search: form.elements.search.value.trim(), state: form.elements.state.value })}`);
  },
  "filter-alerts"(form) {
    const values = Object.fromEntries(new FormData(form));
    router.go(`#/alerts${query(values)}`);
  },
};

/* ===== Router ============================================================= */

const ROUTES = [
  [/^\/login$/, viewLogin],
  [/^\/?$/, viewDashboard],
  [/^\/services$/, viewServices],
  [/^\/services\/new$/, viewServiceForm],
  [/^\/services\/([\w-]+)\/edit$/, viewServiceForm],
  [/^\/services\/([\w-]+)$/, viewService],
  [/^\/alerts$/, viewAlerts],
  [/^\/contacts$/, viewContacts],
];

const router = {
  navigation: 0, // every render takes a number; only the newest may mount
  current: null,
  afterLogin: null,

  go(hash) {
    if (location.hash === hash) this.render();
    else location.hash = hash;
  },

  login() {
    if (!location.hash.startsWith("#/login")) this.afterLogin = location.hash || "#/";
    this.go("#/login");
  },

  /** Draw the page for the current hash; `refresh` keeps focus and scroll (live updates). */
  async render({ refresh = false } = {}) {
    const [path, search] = (location.hash.slice(1) || "/").split("?");
    const match = ROUTES.map(([pattern, view]) => [path.match(pattern), view]).find(([m]) => m);
    if (!session.get() && path !== "/login") return this.login();
    const number = ++this.navigation;
    const [found, view] = match || [null, null];
    let page;
    try {
      page = view ? await view(found.slice(1), new URLSearchParams(search)) : notFound();
    } catch (error) {
      if (error.status === 401) return;
      page = { title: "Problem", body: html`<h1>Something went wrong</h1><p class="empty">${error.message}</p><p><a href="#/">Back to the dashboard</a></p>` };
    }
    if (number !== this.navigation) return; // a newer navigation won
    this.current = page;
    this.show(page, refresh);
  },

  show(page, refresh) {
    const viewElement = $("#view");
    const focused = refresh && document.activeElement && document.activeElement.id;
    document.title = `${page.title} · mkat`;
    $("#top").hidden = Boolean(page.bare);
    $$("[data-nav]").forEach((link) => {
      const here = (location.hash || "#/").split("?")[0];
      link.toggleAttribute("aria-current", link.getAttribute("href") === here || (here.startsWith(link.getAttribute("href") + "/") && link.getAttribute("href") !== "#/"));
    });
    const scroll = window.scrollY;
    mount(viewElement, page.body);
    if (refresh) {
      window.scrollTo(0, scroll);
      const again = focused && document.getElementById(focused); // a button keeps the focus
      if (again) again.focus();
    } else {
      const heading = $("h1", viewElement);
      (heading || viewElement).setAttribute("tabindex", "-1");
      (heading || viewElement).focus({ preventScroll: true });
      window.scrollTo(0, 0);
    }
  },

  /** Redraw a live page (after an event, an action, or a poll) unless the user is busy in it. */
  refresh() {
    if (!this.current || dialog.isOpen()) return;
    if (!this.current.live) return;
    const active = document.activeElement;
    if (active && active.closest("#view") && active.matches("input, select, textarea")) return; // never under the user's typing
    this.render({ refresh: true });
  },
};

function notFound() {
  return { title: "Not found", body: html`<h1>Page not found</h1><p><a href="#/">Back to the dashboard</a></p>` };
}

/* ===== Live events ========================================================= */

/* EventSource cannot send the Authorization header, so the stream is read with fetch() and parsed
 * here. If it cannot be opened (too many streams, an old proxy), the page polls every 10 s while
 * it is visible, and tries the stream again a minute later. */
const events = {
  controller: null,
  pollTimer: null,
  retryTimer: null,
  pending: null,

  setStatus(state) {
    const live = $("#live");
    live.textContent = state;
    live.dataset.state = state;
  },

  start() {
    this.stop();
    this.connect();
  },

  stop() {
    if (this.controller) this.controller.abort();
    this.controller = null;
    clearInterval(this.pollTimer);
    clearTimeout(this.retryTimer);
    this.pollTimer = null;
  },

  async connect() {
    if (!session.get()) return;
    const controller = new AbortController();
    this.controller = controller;
    let opened = false;
    try {
      const response = await fetch("api/v1/events/stream", { headers: apiHeaders(), signal: controller.signal });
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      opened = true;
      this.setStatus("live");
      clearInterval(this.pollTimer);
      this.pollTimer = null;
      router.refresh(); // catch up on what happened while not connected
      await this.read(response.body.getReader());
    } catch {
      // not opened, or cut: poll meanwhile
    }
    if (controller.signal.aborted) return;
    this.poll();
    // A stream that worked and ended (mkat restarted) is tried again soon; one refused, later.
    this.retryTimer = setTimeout(() => this.connect(), opened ? 3000 : 60000);
  },

  async read(reader) {
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (/^event: /m.test(block)) this.changed();
      }
    }
  },

  /** Something changed: redraw soon, once for a burst of events. */
  changed() {
    clearTimeout(this.pending);
    this.pending = setTimeout(() => router.refresh(), 150);
  },

  poll() {
    this.setStatus("polling");
    if (this.pollTimer) return;
    this.pollTimer = setInterval(() => {
      if (document.visibilityState === "visible") router.refresh();
    }, 10000);
  },
};

/* ===== Init ================================================================ */

document.addEventListener("click", async (event) => {
  const target = event.target.closest("[data-action]");
  if (!target || !actions[target.dataset.action]) return;
  event.preventDefault();
  try {
    await actions[target.dataset.action](target, event);
  } catch (error) {
    reportError(error);
  }
});

document.addEventListener("submit", async (event) => {
  const form = event.target.closest("[data-form]");
  if (!form || !forms[form.dataset.form]) return;
  event.preventDefault();
  const button = $("[type=submit]", form);
  if (button) button.disabled = true;
  try {
    await forms[form.dataset.form](form, event);
  } catch (error) {
    reportError(error, form);
  } finally {
    if (button) button.disabled = false;
  }
});

document.addEventListener("change", (event) => {
  const control = event.target.closest("[data-change]");
  if (control && changes[control.dataset.change]) changes[control.dataset.change](control);
});

let searchTimer = null;
document.addEventListener("input", (event) => {
  if (event.target.type !== "search" || !event.target.form) return;
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => event.target.form.requestSubmit(), 300);
});

$("#dialog").addEventListener("click", (event) => {
  if (event.target.id === "dialog") dialog.close(); // a click on the backdrop
});

window.addEventListener("hashchange", () => router.render());
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && events.pollTimer) router.refresh();
});
setInterval(() => $$("time[datetime]").forEach((t) => {
  if (t.textContent === relative(t.dateTime)) return;
  if (!t.querySelector("span")) t.textContent = relative(t.dateTime);
}), 30000);

if (session.get()) events.start();
router.render();
