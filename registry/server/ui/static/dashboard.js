// The dashboard's pages: Alpine.js components (CSP build: no eval, no inline script) that
// read /api with the X-API-Key header and follow /api/events for live changes.
//
// Every value reaches the page through x-text or an attribute binding (textContent and
// setAttribute), never as HTML, so a client id such as "<script>" shows as text.
"use strict";

const KEY_STORE = "registry.api-key"; // sessionStorage: this tab only, never in a URL

// -- the API key ------------------------------------------------------------------------------

let keyWaiters = [];

function auth() {
  return Alpine.store("auth");
}

// Resolves once the user has entered a key (after a 401).
function askForKey(message) {
  const store = auth();
  store.error = message;
  store.needed = true;
  focusWhenShown(document.getElementById("key-input"), 50);
  return new Promise((resolve) => keyWaiters.push(resolve));
}

// Focus `element` once it is shown (x-show applies the change a little later), trying every
// 20 ms at most `tries` times.
function focusWhenShown(element, tries) {
  if (element.offsetParent !== null) element.focus();
  else if (tries > 0) setTimeout(() => focusWhenShown(element, tries - 1), 20);
}

function keyEntered(key) {
  sessionStorage.setItem(KEY_STORE, key);
  const store = auth();
  store.key = key;
  store.needed = false;
  document.getElementById("main").focus(); // where the data is about to appear
  const waiters = keyWaiters;
  keyWaiters = [];
  waiters.forEach((resolve) => resolve());
}

function headers(extra) {
  const key = auth().key;
  return Object.assign(key ? { "X-API-Key": key } : {}, extra || {});
}

async function refused(response) {
  let detail = "The key was refused.";
  try {
    detail = (await response.json()).detail || detail;
  } catch (_) {
    /* not JSON: keep the generic text */
  }
  sessionStorage.removeItem(KEY_STORE);
  auth().key = "";
  await askForKey(detail);
}

// -- reading /api -------------------------------------------------------------------------------

function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params || {})) {
    if (Array.isArray(value)) value.forEach((item) => search.append(name, item));
    else if (value !== null && value !== undefined && value !== "") search.set(name, value);
  }
  const text = search.toString();
  return text ? "?" + text : "";
}

// GET an /api route as JSON; asks for the key on a 401 and tries again with it.
async function api(path, params) {
  for (;;) {
    const response = await fetch(path + query(params), { headers: headers() });
    if (response.status === 401) {
      await refused(response);
      continue;
    }
    if (!response.ok) {
      let detail = response.statusText;
      try {
        const body = await response.json();
        detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      } catch (_) {
        /* keep the status text */
      }
      throw new Error(`${path}: ${response.status} ${detail}`);
    }
    return response.json();
  }
}

// Every page of a paged route, up to `most` items.
async function allPages(path, params, most) {
  const items = [];
  let cursor = null;
  do {
    const page = await api(path, Object.assign({}, params, { limit: 1000, cursor }));
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < most);
  return { items, truncated: Boolean(cursor) };
}

// -- the event stream -----------------------------------------------------------------------
//
// EventSource cannot send headers, so it would need the key in the URL (kept in logs and
// history) or a cookie (a second way to authenticate, open to cross-site requests). fetch()
// can send X-API-Key and read the stream as it comes; this reader parses the SSE format and
// resumes after a drop with Last-Event-ID, as EventSource would.

function follow(params, handlers) {
  let lastId = null;
  let stopped = false;
  const controller = new AbortController();

  async function once() {
    const extra = lastId === null ? {} : { "Last-Event-ID": String(lastId) };
    const response = await fetch("/api/events" + query(params), {
      headers: headers(extra),
      signal: controller.signal,
      cache: "no-store",
    });
    if (response.status === 401) {
      await refused(response);
      return;
    }
    if (!response.ok) throw new Error(`/api/events: ${response.status}`);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let fields = {};
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 2 : 1));
        if (line === ": subscribed") {
          if (handlers.live) handlers.live();
        } else if (line === "") {
          if (fields.data !== undefined) {
            if (fields.id !== undefined) lastId = Number(fields.id);
            handlers.event(fields.event, JSON.parse(fields.data));
          }
          fields = {};
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const name = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          fields[name] = name === "data" && fields.data !== undefined ? fields.data + "\n" + text : text;
        }
      }
    }
  }

  (async () => {
    while (!stopped) {
      try {
        await once();
      } catch (error) {
        if (stopped) return;
        if (handlers.error) handlers.error(error);
      }
      if (handlers.lost) handlers.lost();
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  })();
  return () => {
    stopped = true;
    controller.abort();
  };
}

// -- formatting ---------------------------------------------------------------------------------

function localTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function utcTime(iso) {
  return iso
    ? new Date(iso)
        .toISOString()
        .replace("T", " ")
        .replace(/\.\d+Z$/, " UTC")
    : "";
}

function seconds(value) {
  if (value === null || value === undefined) return "";
  if (value < 60) return `${value.toFixed(1)} s`;
  if (value < 3600) return `${(value / 60).toFixed(1)} min`;
  if (value < 86400) return `${(value / 3600).toFixed(1)} h`;
  return `${(value / 86400).toFixed(1)} d`;
}

function percent(fraction) {
  return fraction === null || fraction === undefined ? "" : `${(fraction * 100).toFixed(1)} %`;
}

// An ISO instant `hours` before now, for windows such as "last 24 h".
function hoursAgo(hours) {
  return new Date(Date.now() - hours * 3600 * 1000).toISOString();
}

// datetime-local input value (browser zone) <-> ISO instant.
function toInput(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  const local = new Date(date.getTime() - date.getTimezoneOffset() * 60000);
  return local.toISOString().slice(0, 16);
}

function fromInput(value) {
  return value ? new Date(value).toISOString() : "";
}

const NORMAL_REASONS = ["client_closed", "going_away", "removed", "server_shutdown"];

// How a connection ended, for colours and legends: open, normal or abnormal.
function ending(row) {
  if (!row.disconnected_at) return "open";
  return NORMAL_REASONS.includes(row.close_reason) ? "normal" : "abnormal";
}

// -- CSV ----------------------------------------------------------------------------------------

function csvCell(value) {
  let text =
    value === null || value === undefined
      ? ""
      : typeof value === "object"
        ? JSON.stringify(value)
        : String(value);
  if (/^[=+\-@\t\r]/.test(text)) text = "'" + text; // never a formula in a spreadsheet
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

// Download `rows` as CSV; `columns` are [header, key or function(row)].
function downloadCsv(name, columns, rows) {
  const lines = [columns.map(([header]) => csvCell(header)).join(",")];
  for (const row of rows) {
    lines.push(columns.map(([, get]) => csvCell(typeof get === "function" ? get(row) : row[get])).join(","));
  }
  const blob = new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv;charset=utf-8" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${name}.csv`;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

// -- URL state (shareable links: filters in the query string, never the key) --------------------

function urlParams() {
  return Object.fromEntries(new URLSearchParams(location.search));
}

function setUrlParams(params) {
  const url = location.pathname + query(params);
  if (url !== location.pathname + location.search) history.replaceState(null, "", url);
}

// -- charts -------------------------------------------------------------------------------------

const COLOURS = {
  open: "#2e7d32",
  normal: "#1565c0",
  abnormal: "#c62828",
  connects: "#1565c0",
  disconnects: "#ef6c00",
};

// Chart.js loads after Alpine.js (the data can be on its way meanwhile): before the document
// has finished parsing it may not have run yet.
async function drawChart(canvas, config) {
  if (typeof Chart === "undefined" && document.readyState === "loading") {
    await new Promise((resolve) => document.addEventListener("DOMContentLoaded", resolve, { once: true }));
  }
  const existing = Chart.getChart(canvas);
  if (existing) existing.destroy();
  return new Chart(canvas, config);
}

// {name: count} as rows [{name, count}], largest first.
function counts(object) {
  return Object.entries(object)
    .map(([name, count]) => ({ name, count }))
    .sort((a, b) => b.count - a.count || a.name.localeCompare(b.name));
}

// -- what every page component has ---------------------------------------------------------------

// The shared part with `extra` added, getters and setters kept (Object.assign would call them).
function page(extra) {
  const shared = {
    error: "",
    loading: false,
    local: localTime,
    utc: utcTime,
    seconds,
    percent,
    ending,
    clientHref: (id) => (id ? "/ui/client" + query({ id }) : ""),
    sessionHref: (id) => (id ? "/ui/session" + query({ id }) : ""),
    stateHref: (state) => "/ui/sessions" + query({ state }),
    auditHref: (client) => "/ui/audit" + query({ client }),
    json: (value) => (value === null || value === undefined ? "" : JSON.stringify(value)),
    async guard(work) {
      this.loading = true;
      this.error = "";
      try {
        await work();
        await this.$nextTick();
        // When the data is on the page (the first time: what bench/ui.py measures).
        performance.mark("registry:data-shown");
      } catch (error) {
        this.error = String(error.message || error);
      } finally {
        this.loading = false;
      }
    },
  };
  return Object.defineProperties(shared, Object.getOwnPropertyDescriptors(extra));
}

// Columns of the tables the pages share.
const CONNECTION_COLUMNS = [
  ["connected_at (UTC)", "connected_at"],
  ["disconnected_at (UTC)", "disconnected_at"],
  ["client_id", "client_id"],
  ["client_type", "client_type"],
  ["platform", "platform"],
  ["node_id", "node_id"],
  ["close_code", "close_code"],
  ["close_reason", "close_reason"],
  ["duration_seconds", "duration_seconds"],
  ["remote_address", "remote_address"],
];
const SESSION_COLUMNS = [
  ["session_id", "session_id"],
  ["state", "state"],
  ["owner_id", "owner_id"],
  ["executor_id", "executor_id"],
  ["task_name", "task_name"],
  ["created_at (UTC)", "created_at"],
  ["ended_at (UTC)", "ended_at"],
  ["end_reason", "end_reason"],
  ["node_id", "node_id"],
];
const AUDIT_COLUMNS = [
  ["event_id", "event_id"],
  ["at (UTC)", "at"],
  ["kind", "kind"],
  ["client_id", "client_id"],
  ["session_id", "session_id"],
  ["node_id", "node_id"],
  ["details", "details"],
];

// -- components ---------------------------------------------------------------------------------

document.addEventListener("alpine:init", () => {
  // x-time="expr" on a <time>: the instant in the browser's zone, UTC on hover, one
  // evaluation instead of three bindings (the CSP build parses every expression it runs).
  Alpine.directive("time", (el, { expression }, { evaluateLater, effect }) => {
    const read = evaluateLater(expression);
    effect(() =>
      read((iso) => {
        el.textContent = localTime(iso);
        el.title = utcTime(iso);
        el.dateTime = iso || "";
      }),
    );
  });

  Alpine.store("auth", { key: sessionStorage.getItem(KEY_STORE) || "", needed: false, error: "" });

  Alpine.data("keyGate", () => ({
    draft: "",
    submit() {
      keyEntered(this.draft);
      this.draft = "";
    },
  }));

  Alpine.data("keyStatus", () => ({
    forget() {
      sessionStorage.removeItem(KEY_STORE);
      location.reload();
    },
  }));

  Alpine.data("overview", () =>
    page({
      window: "24h",
      stats: null,
      store: null,
      nodes: [],
      abnormal: [],
      hours: [],
      byType: [],
      byPlatform: [],
      byState: [],
      byReason: [],
      init() {
        this.window = urlParams().window === "7d" ? "7d" : "24h";
        this.load();
      },
      choose(window) {
        this.window = window;
        setUrlParams({ window: window === "24h" ? "" : window });
        this.load();
      },
      pressed(window) {
        return this.window === window ? "true" : "false";
      },
      get onlineTotal() {
        return this.byType.reduce((sum, row) => sum + row.count, 0);
      },
      async load() {
        await this.guard(async () => {
          const hours = this.window === "7d" ? 168 : 24;
          const since = hoursAgo(hours);
          const [stats, store, nodes, abnormal, hourly] = await Promise.all([
            api("/api/stats", { since }),
            api("/api/store"),
            api("/api/nodes", { running: true }),
            api("/api/disconnects", { abnormal: true, limit: 20 }),
            api("/api/stats/hourly", { since }),
          ]);
          this.stats = stats;
          this.store = store;
          this.nodes = nodes;
          this.abnormal = abnormal.items;
          this.hours = hourly.items;
          this.byType = counts(stats.online_by_type);
          this.byPlatform = counts(stats.online_by_platform);
          this.byState = counts(stats.sessions_by_state);
          this.byReason = counts(stats.disconnects_by_reason);
          await this.chart();
        });
      },
      async chart() {
        const labels = this.hours.map((hour) => {
          const date = new Date(hour.hour);
          return this.window === "7d"
            ? date.toLocaleString([], { weekday: "short", hour: "2-digit" })
            : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
        });
        await drawChart(this.$refs.hourly, {
          type: "bar",
          data: {
            labels,
            datasets: [
              {
                label: "connections",
                data: this.hours.map((h) => h.connects),
                backgroundColor: COLOURS.connects,
              },
              {
                label: "disconnects",
                data: this.hours.map((h) => h.disconnects),
                backgroundColor: COLOURS.disconnects,
              },
            ],
          },
          options: { animation: false, maintainAspectRatio: false, scales: { y: { beginAtZero: true } } },
        });
      },
      csv(table) {
        const tables = {
          online: [
            [
              ["by", "by"],
              ["name", "name"],
              ["online", "count"],
            ],
            [
              ...this.byType.map((row) => Object.assign({ by: "type" }, row)),
              ...this.byPlatform.map((row) => Object.assign({ by: "platform" }, row)),
              ...this.nodes.map((node) => ({ by: "node", name: node.name, count: node.online })),
            ],
          ],
          nodes: [
            [
              ["node_id", "node_id"],
              ["name", "name"],
              ["hostname", "hostname"],
              ["pid", "pid"],
              ["started_at (UTC)", "started_at"],
              ["heartbeat_at (UTC)", "heartbeat_at"],
              ["online", "online"],
            ],
            this.nodes,
          ],
          hours: [
            [
              ["hour (UTC)", "hour"],
              ["connects", "connects"],
              ["disconnects", "disconnects"],
              ["connected_seconds", "connected_seconds"],
              ["disconnects_by_reason", "disconnects_by_reason"],
            ],
            this.hours,
          ],
          states: [
            [
              ["state", "name"],
              ["sessions", "count"],
            ],
            this.byState,
          ],
          reasons: [
            [
              ["close_reason", "name"],
              ["disconnects", "count"],
            ],
            this.byReason,
          ],
          abnormal: [CONNECTION_COLUMNS, this.abnormal],
        };
        const [columns, rows] = tables[table];
        downloadCsv(`${table}`, columns, rows);
      },
    }),
  );

  Alpine.data("clients", () =>
    page({
      filters: { q: "", type: "", platform: "", node: "" },
      rows: [],
      cursor: null,
      cursors: [],
      live: false,
      stop: null,
      held: null, // events that came while a page was loading, applied once it is shown
      init() {
        const params = urlParams();
        for (const name of Object.keys(this.filters)) this.filters[name] = params[name] || "";
        // The stream first, the listing once it is live: a join or leave committed after the
        // listing was read comes as an event, and one it already holds changes nothing when
        // applied again. Resumed streams (Last-Event-ID) miss nothing, so no reload then.
        let listed = false;
        this.stop = follow(
          { kind: ["join", "leave"] },
          {
            live: () => {
              this.live = true;
              if (!listed) {
                listed = true;
                this.load();
              }
            },
            lost: () => {
              this.live = false;
            },
            event: (kind, event) => (this.held ? this.held.push([kind, event]) : this.apply(kind, event)),
          },
        );
      },
      destroy() {
        if (this.stop) this.stop();
      },
      search() {
        setUrlParams(this.filters);
        this.cursors = [];
        this.load();
      },
      next() {
        this.cursors.push(this.cursor);
        this.load();
      },
      previous() {
        this.cursors.pop();
        this.load();
      },
      get first() {
        return this.cursors.length === 0;
      },
      async load() {
        this.held = [];
        await this.guard(async () => {
          const at = this.cursors.length ? this.cursors[this.cursors.length - 1] : null;
          const body = await api("/api/online", Object.assign({ limit: 100, cursor: at }, this.filters));
          this.rows = body.items;
          this.cursor = body.next_cursor;
        });
        const held = this.held;
        this.held = null;
        held.forEach(([kind, event]) => this.apply(kind, event));
      },
      matches(row) {
        const f = this.filters;
        return (
          (!f.type || row.client_type === f.type) &&
          (!f.platform || row.platform.toLowerCase() === f.platform.toLowerCase()) &&
          (!f.node || row.node_id === f.node) &&
          (!f.q || row.client_id.toLowerCase().includes(f.q.toLowerCase()))
        );
      },
      // A join or leave as it is committed: the page shown changes in place, without reload.
      // The listing is newest connection first, so a join goes on top of the first page.
      apply(kind, event) {
        const index = this.rows.findIndex((row) => row.client_id === event.client_id);
        if (index >= 0) this.rows.splice(index, 1);
        if (kind !== "join" || !this.first) return;
        const row = {
          client_id: event.client_id,
          client_type: event.details.client_type,
          platform: event.details.platform,
          node_id: event.node_id,
          connected_at: event.at,
        };
        if (this.matches(row)) this.rows.unshift(row);
      },
      csv() {
        downloadCsv(
          "clients",
          [
            ["client_id", "client_id"],
            ["client_type", "client_type"],
            ["platform", "platform"],
            ["node_id", "node_id"],
            ["connected_at (UTC)", "connected_at"],
          ],
          this.rows,
        );
      },
    }),
  );

  Alpine.data("client", () =>
    page({
      id: "",
      window: "7d",
      summary: null,
      connections: [],
      truncated: false,
      // Rows of the connections table rendered (the timeline and the CSV have them all): a
      // flapping device has thousands in a week.
      shown: 100,
      availability: null,
      snapshots: [],
      sessions: [],
      audit: [],
      init() {
        const params = urlParams();
        this.id = params.id || "";
        this.window = ["24h", "7d", "30d"].includes(params.window) ? params.window : "7d";
        if (this.id) this.load();
      },
      choose(window) {
        this.window = window;
        setUrlParams({ id: this.id, window: window === "7d" ? "" : window });
        this.load();
      },
      pressed(window) {
        return this.window === window ? "true" : "false";
      },
      async load() {
        await this.guard(async () => {
          const hours = { "24h": 24, "7d": 168, "30d": 720 }[this.window];
          const since = hoursAgo(hours);
          const path = "/api/clients/" + encodeURIComponent(this.id);
          const [summary, inside, before, snapshots, sessions, audit] = await Promise.all([
            api(path),
            allPages(path + "/connections", { since }, 5000),
            api(path + "/connections", { until: since, limit: 1 }),
            api("/api/devices/" + encodeURIComponent(this.id) + "/info/history", { limit: 50 }),
            api("/api/sessions", { client: this.id, limit: 100 }),
            api("/api/audit", { client: this.id, order: "desc", limit: 100 }),
          ]);
          this.summary = summary;
          // A connection opened before the window that lasted into it belongs on the timeline.
          const straddling = before.items.filter(
            (row) => !row.disconnected_at || row.disconnected_at > since,
          );
          this.connections = inside.items.concat(straddling);
          this.truncated = inside.truncated;
          this.shown = 100;
          this.snapshots = diffSnapshots(snapshots.items);
          this.sessions = sessions.items;
          this.audit = audit.items;
          await this.timeline(Date.parse(since), Date.now());
        });
      },
      get shownConnections() {
        return this.connections.slice(0, this.shown);
      },
      showAll() {
        this.shown = this.connections.length;
      },
      async timeline(start, end) {
        let covered = 0;
        const bars = this.connections.map((row) => {
          const from = Math.max(Date.parse(row.connected_at), start);
          const to = Math.min(row.disconnected_at ? Date.parse(row.disconnected_at) : end, end);
          covered += Math.max(0, to - from);
          return { x: [from, Math.max(to, from + 1)], y: "connections", row };
        });
        // Overlapping connections (a replaced twin) count once at most in total.
        this.availability = Math.min(covered / (end - start), 1);
        const datasets = ["open", "normal", "abnormal"].map((how) => ({
          label: { open: "open", normal: "closed normally", abnormal: "closed abnormally" }[how],
          data: bars.filter((bar) => ending(bar.row) === how),
          backgroundColor: COLOURS[how],
          borderSkipped: false,
          minBarLength: 3,
          barPercentage: 0.9,
          categoryPercentage: 1,
          grouped: false,
        }));
        await drawChart(this.$refs.timeline, {
          type: "bar",
          data: { labels: ["connections"], datasets },
          options: {
            indexAxis: "y",
            animation: false,
            maintainAspectRatio: false,
            scales: {
              x: {
                type: "linear",
                min: start,
                max: end,
                ticks: {
                  callback: (value) =>
                    new Date(value).toLocaleString([], {
                      month: "short",
                      day: "numeric",
                      hour: "2-digit",
                      minute: "2-digit",
                    }),
                },
              },
              y: { display: false },
            },
            plugins: {
              tooltip: {
                callbacks: {
                  label: (item) => {
                    const row = item.raw.row;
                    return `${localTime(row.connected_at)} → ${row.disconnected_at ? localTime(row.disconnected_at) : "open"} ${row.close_reason || ""}`;
                  },
                },
              },
            },
          },
        });
      },
      csv(table) {
        const tables = {
          connections: [CONNECTION_COLUMNS, this.connections],
          snapshots: [
            [
              ["captured_at (UTC)", "captured_at"],
              ["changes", (row) => row.changes.map((c) => c.text).join("; ")],
              ["info", "info"],
            ],
            this.snapshots,
          ],
          sessions: [SESSION_COLUMNS, this.sessions],
          audit: [AUDIT_COLUMNS, this.audit],
        };
        const [columns, rows] = tables[table];
        downloadCsv(`${this.id}-${table}`, columns, rows);
      },
    }),
  );

  Alpine.data("sessions", () =>
    page({
      filters: { state: "", client: "", role: "", since: "", until: "" },
      rows: [],
      cursor: null,
      cursors: [],
      init() {
        const params = urlParams();
        for (const name of Object.keys(this.filters)) this.filters[name] = params[name] || "";
        this.load();
      },
      get sinceInput() {
        return toInput(this.filters.since);
      },
      set sinceInput(value) {
        this.filters.since = fromInput(value);
      },
      get untilInput() {
        return toInput(this.filters.until);
      },
      set untilInput(value) {
        this.filters.until = fromInput(value);
      },
      search() {
        if (!this.filters.client) this.filters.role = "";
        setUrlParams(this.filters);
        this.cursors = [];
        this.load();
      },
      next() {
        this.cursors.push(this.cursor);
        this.load();
      },
      previous() {
        this.cursors.pop();
        this.load();
      },
      get first() {
        return this.cursors.length === 0;
      },
      async load() {
        await this.guard(async () => {
          const at = this.cursors.length ? this.cursors[this.cursors.length - 1] : null;
          const body = await api(
            "/api/sessions",
            Object.assign({}, this.filters, { limit: 100, cursor: at }),
          );
          this.rows = body.items;
          this.cursor = body.next_cursor;
        });
      },
      csv() {
        downloadCsv("sessions", SESSION_COLUMNS, this.rows);
      },
    }),
  );

  Alpine.data("session", () =>
    page({
      id: "",
      detail: null,
      init() {
        this.id = urlParams().id || "";
        if (this.id) this.load();
      },
      async load() {
        await this.guard(async () => {
          this.detail = await api("/api/sessions/" + encodeURIComponent(this.id));
        });
      },
      get record() {
        return this.detail ? this.detail.session : {};
      },
      get took() {
        const s = this.record;
        return s.ended_at ? seconds((Date.parse(s.ended_at) - Date.parse(s.created_at)) / 1000) : "";
      },
      csv(table) {
        if (table === "links") {
          downloadCsv(
            `${this.id}-links`,
            [
              ["client_id", "client_id"],
              ["role", "role"],
              ["bound_at (UTC)", "bound_at"],
              ["unbound_at (UTC)", "unbound_at"],
            ],
            this.detail.links,
          );
        } else {
          downloadCsv(`${this.id}-audit`, AUDIT_COLUMNS, this.detail.events);
        }
      },
    }),
  );

  Alpine.data("audit", () =>
    page({
      filters: { kind: "", client: "", session: "", since: "", until: "" },
      rows: [],
      cursor: null,
      cursors: [],
      kinds: [
        "client_registered",
        "client_removed",
        "client_replaced",
        "client_duplicate_refused",
        "connection_recovered",
        "session_opened",
        "session_bound",
        "session_unbound",
        "session_ended",
        "session_interrupted",
        "device_info_changed",
        "node_started",
        "node_stopped",
        "node_recovered",
        "pruned",
      ],
      init() {
        const params = urlParams();
        for (const name of Object.keys(this.filters)) this.filters[name] = params[name] || "";
        this.load();
      },
      get sinceInput() {
        return toInput(this.filters.since);
      },
      set sinceInput(value) {
        this.filters.since = fromInput(value);
      },
      get untilInput() {
        return toInput(this.filters.until);
      },
      set untilInput(value) {
        this.filters.until = fromInput(value);
      },
      search() {
        setUrlParams(this.filters);
        this.cursors = [];
        this.load();
      },
      next() {
        this.cursors.push(this.cursor);
        this.load();
      },
      previous() {
        this.cursors.pop();
        this.load();
      },
      get first() {
        return this.cursors.length === 0;
      },
      async load() {
        await this.guard(async () => {
          const at = this.cursors.length ? this.cursors[this.cursors.length - 1] : null;
          const body = await api(
            "/api/audit",
            Object.assign({}, this.filters, { order: "desc", limit: 100, cursor: at }),
          );
          this.rows = body.items;
          this.cursor = body.next_cursor;
        });
      },
      csv() {
        downloadCsv("audit", AUDIT_COLUMNS, this.rows);
      },
    }),
  );
});

// -- device info snapshots: what changed between one and the one before it -----------------------

function flatten(value, prefix, out) {
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    for (const [key, inner] of Object.entries(value)) flatten(inner, prefix ? `${prefix}.${key}` : key, out);
  } else {
    out[prefix] = JSON.stringify(value);
  }
  return out;
}

// Snapshots newest first, each with its `changes` against the next older one.
function diffSnapshots(snapshots) {
  return snapshots.map((snapshot, index) => {
    const now = flatten(snapshot.info, "", {});
    const older = snapshots[index + 1];
    if (!older) return Object.assign({ changes: [{ text: "first snapshot", how: "first" }] }, snapshot);
    const before = flatten(older.info, "", {});
    const changes = [];
    for (const key of Object.keys(now)) {
      if (!(key in before)) changes.push({ text: `+ ${key} = ${now[key]}`, how: "added" });
      else if (before[key] !== now[key])
        changes.push({ text: `~ ${key}: ${before[key]} → ${now[key]}`, how: "changed" });
    }
    for (const key of Object.keys(before))
      if (!(key in now)) changes.push({ text: `- ${key}`, how: "removed" });
    return Object.assign({ changes }, snapshot);
  });
}
