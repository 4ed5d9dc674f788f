// Muster dashboard: one page, no dependencies, served from the server binary.
//
// It is an ordinary API client. The operator's token lives in sessionStorage (gone when the tab
// closes) and travels only in the Authorization header, never in a URL. Live updates come from
// the server-sent event streams, read with fetch() because EventSource cannot send that header.
// Everything an agent reports (hostnames, labels, output) is untrusted text: it reaches the page
// only through textContent, never as HTML.

'use strict';

const TOKEN_KEY = 'muster.token';
const ROLE_RANK = { viewer: 0, operator: 1, admin: 2 };
const FINAL_STATES = new Set(['succeeded', 'failed', 'timed_out', 'cancelled', 'expired', 'skipped', 'lost']);
const STATE_ORDER = ['running', 'dispatched', 'pending', 'succeeded', 'failed', 'timed_out', 'cancelled', 'expired', 'skipped', 'lost'];
const STATUS_RANK = { offline: 0, stale: 1, online: 2 };
// Rows a table draws at first; the fleet table draws more on request. A table's layout is
// redone on every live update, so the rows on screen, not the fleet, set the page's cost.
const PAGE_ROWS = 200;
const MAX_ROWS = 500;

const session = { token: null, who: null };

// ---------------------------------------------------------------------------------------------
// DOM helpers

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  applyProps(el, props);
  append(el, children);
  return el;
}

const SVG_NS = 'http://www.w3.org/2000/svg';
function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function applyProps(el, props) {
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k in el && !k.startsWith('data-') && !k.startsWith('aria-') && k !== 'list') el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

function pill(kind, value, text) {
  return h('span', { class: 'pill', [`data-${kind}`]: value }, text || value.replace('_', ' '));
}

function chips(labels) {
  const entries = Object.entries(labels || {});
  if (!entries.length) return h('span', { class: 'muted' }, '–');
  return h('div', { class: 'chips' }, entries.map(([k, v]) => h('span', { class: 'chip' }, `${k}=${v}`)));
}

// Marks an agent that waits for an administrator's approval: it gets no runs until accepted.
function pendingMarker() {
  return h('span', { class: 'badge pending', title: 'Enrolled with an approve token: gets no runs until an admin accepts it' }, 'pending approval');
}

// Marks an agent that runs only jobs signed by one of `keys` (what it reported).
function signedMarker(keys) {
  return h('span', { class: 'badge signed', title: `Runs only jobs signed by ${keys.join(', ')}` }, 'signed only');
}

function meter(pct) {
  if (pct === null || pct === undefined || !Number.isFinite(pct)) return h('span', { class: 'muted' }, '–');
  const level = pct >= 90 ? 'high' : pct >= 75 ? 'warn' : 'ok';
  const fill = h('div', { class: 'fill', 'data-level': level });
  fill.style.width = `${Math.min(100, Math.max(0, pct)).toFixed(1)}%`;
  return h('div', { class: 'meter' }, h('div', { class: 'bar' }, fill), h('span', { class: 'pct' }, `${Math.round(pct)}%`));
}

// ---------------------------------------------------------------------------------------------
// Formatting

function parseTime(ts) {
  return ts ? Date.parse(ts) : NaN;
}

function ago(ts) {
  const t = parseTime(ts);
  if (!Number.isFinite(t)) return 'never';
  const s = Math.max(0, Math.round((Date.now() - t) / 1000));
  if (s < 2) return 'just now';
  if (s < 90) return `${s}s ago`;
  if (s < 90 * 60) return `${Math.round(s / 60)}m ago`;
  if (s < 36 * 3600) return `${Math.round(s / 3600)}h ago`;
  return `${Math.round(s / 86400)}d ago`;
}

function duration(ms) {
  if (!Number.isFinite(ms) || ms < 0) return '–';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return Math.round(s % 60) ? `${m}m ${Math.round(s % 60)}s` : `${m}m`;
  const hrs = Math.floor(m / 60);
  if (hrs < 48) return `${hrs}h ${m % 60}m`;
  return `${Math.floor(hrs / 24)}d ${hrs % 24}h`;
}

function bytes(n) {
  if (!Number.isFinite(n)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i === 0 || n >= 100 ? 0 : 1)} ${units[i]}`;
}

function localTime(ts) {
  const t = parseTime(ts);
  return Number.isFinite(t) ? new Date(t).toLocaleString() : '–';
}

// '5s', '2m', '1h' in milliseconds.
function parseStep(step) {
  const n = parseInt(step, 10);
  return n * { s: 1e3, m: 60e3, h: 3600e3 }[step.slice(-1)];
}

function pct(used, total) {
  return total > 0 ? (used / total) * 100 : null;
}

function commandText(spec) {
  if (!spec || !spec.program) return '';
  if (spec.program.argv) return spec.program.argv.join(' ');
  return `sh -c ${JSON.stringify(spec.program.shell)}`;
}

function targetText(target) {
  if (target === 'all') return 'all agents';
  if (target && target.selector !== undefined) return `selector ${target.selector}`;
  if (target && target.agents) return target.agents.length === 1 ? `agent ${target.agents[0]}` : `${target.agents.length} agents`;
  return String(target);
}

function exitText(run) {
  if (run.exit_code !== null && run.exit_code !== undefined) return `exit ${run.exit_code}`;
  if (run.signal !== null && run.signal !== undefined) return `signal ${run.signal}`;
  return '';
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many || `${one}s`}`;
}

// ---------------------------------------------------------------------------------------------
// API

class ApiError extends Error {
  constructor(status, kind, message) {
    super(message);
    this.status = status;
    this.kind = kind;
  }
}

function authHeaders(extra) {
  return { Authorization: `Bearer ${session.token}`, ...(extra || {}) };
}

async function api(method, path, body) {
  const init = { method, headers: authHeaders(), cache: 'no-store' };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(`/api/v1${path}`, init);
  } catch (e) {
    throw new ApiError(0, 'network', 'The server cannot be reached.');
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  // A token that stops working mid-session (revoked, expired) ends the session.
  if (res.status === 401 && session.who) {
    signOut((data && data.message) || 'The server refused the token.');
  }
  if (!res.ok) {
    throw new ApiError(res.status, data && data.error, (data && data.message) || `${res.status} ${res.statusText}`);
  }
  return data;
}

// Server-sent events from a fetch() response: yields {id, event, data}.
async function* readEvents(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const ev = { id: null, event: 'message', data: [] };
      for (const line of block.split('\n')) {
        if (!line || line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'data') ev.data.push(val);
        else if (field === 'id') ev.id = val;
        else if (field === 'event') ev.event = val;
      }
      if (ev.data.length) yield { id: ev.id, event: ev.event, data: ev.data.join('\n') };
    }
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    if (signal) signal.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

// Backoff for the live streams: full jitter between 0.5 s and a ceiling that doubles to 30 s,
// back to the start once a connection has stayed up for 30 s.
function nextDelay(ceiling) {
  return 500 + Math.random() * ceiling;
}

// The fleet event stream: one connection for the whole session, shared by every page.
const fleet = {
  listeners: new Set(),
  stateListeners: new Set(),
  state: 'connecting',
  lastId: null,
  ctl: null,

  start() {
    this.stop();
    const ctl = new AbortController();
    this.ctl = ctl;
    this.lastId = null;
    this.run(ctl.signal);
  },

  stop() {
    if (this.ctl) this.ctl.abort();
    this.ctl = null;
  },

  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  },

  onState(fn) {
    this.stateListeners.add(fn);
    fn(this.state);
    return () => this.stateListeners.delete(fn);
  },

  setState(state) {
    this.state = state;
    for (const fn of this.stateListeners) fn(state);
  },

  emit(event) {
    for (const fn of [...this.listeners]) {
      try { fn(event); } catch (e) { console.error('event handler failed', e); }
    }
  },

  async run(signal) {
    let ceiling = 1000;
    let first = true;
    while (!signal.aborted) {
      let upSince = null;
      try {
        const headers = authHeaders(this.lastId ? { 'Last-Event-ID': this.lastId } : {});
        const res = await fetch('/api/v1/events', { headers, signal, cache: 'no-store' });
        if (res.status === 401) { signOut('The server refused the token.'); return; }
        if (!res.ok) throw new Error(`events: ${res.status}`);
        upSince = Date.now();
        this.setState('live');
        // Without an id to resume from, anything between connections is unknown: pages reload.
        if (!first && !this.lastId) this.emit({ type: 'resync' });
        first = false;
        for await (const ev of readEvents(res)) {
          if (ev.id) this.lastId = ev.id;
          let data;
          try { data = JSON.parse(ev.data); } catch (e) { continue; }
          if (data.type === 'resync') this.lastId = null;
          this.emit(data);
        }
      } catch (e) {
        if (signal.aborted) return;
      }
      if (signal.aborted) return;
      this.setState('reconnecting');
      if (upSince && Date.now() - upSince > 30000) ceiling = 1000;
      await sleep(nextDelay(ceiling), signal);
      ceiling = Math.min(ceiling * 2, 30000);
    }
  },
};

// One clock for every "3s ago" on the page.
const ticker = {
  fns: new Set(),
  start() { setInterval(() => { for (const fn of this.fns) fn(); }, 1000); },
  add(fn) { this.fns.add(fn); return () => this.fns.delete(fn); },
};

// Runs `fn` at most once per `ms`, on an animation frame, however often it is asked.
function throttled(fn, ms) {
  let pending = false;
  let last = 0;
  return () => {
    if (pending) return;
    pending = true;
    const wait = Math.max(0, last + ms - Date.now());
    setTimeout(() => requestAnimationFrame(() => { pending = false; last = Date.now(); fn(); }), wait);
  };
}

function debounced(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

// ---------------------------------------------------------------------------------------------
// Session and shell

function isAdmin() {
  return !!session.who && ROLE_RANK[session.who.role] >= ROLE_RANK.admin;
}

function canRun() {
  return session.who && ROLE_RANK[session.who.role] >= ROLE_RANK.operator;
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  session.token = null;
  session.who = null;
  fleet.stop();
  unmountView();
  renderLogin(message);
}

function renderLogin(message) {
  const app = clear(document.getElementById('app'));
  const input = h('input', {
    type: 'password', id: 'token', name: 'token', autocomplete: 'current-password', required: true,
    placeholder: 'mst_…', spellcheck: false,
  });
  const error = h('div', { class: 'notice error', role: 'alert' });
  if (message) error.textContent = message; else error.classList.add('hidden');
  const button = h('button', { class: 'primary', type: 'submit' }, 'Sign in');
  const form = h('form', { class: 'panel', onsubmit: async (e) => {
    e.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    button.disabled = true;
    error.classList.add('hidden');
    try {
      await signIn(token);
    } catch (err) {
      error.textContent = err.status === 401 ? 'That token was refused: it is wrong, expired or revoked.' : err.message;
      error.classList.remove('hidden');
      button.disabled = false;
      input.select();
    }
  } },
  h('h1', {}, h('img', { src: '/ui/icon.svg', alt: '' }), 'Muster'),
  h('p', {}, 'Fleet health and commands. Sign in with your Muster token (mst_…); it is kept in this browser tab only, until you sign out or close it.'),
  error,
  h('label', { class: 'field' }, h('span', {}, 'Token'), input,
    h('div', { class: 'hint' }, 'Create one with ', h('code', {}, 'muster token create'), ' or ', h('code', {}, 'muster-server bootstrap'), '.')),
  button);
  app.append(h('div', { class: 'login' }, form));
  input.focus();
}

async function signIn(token) {
  session.token = token;
  try {
    session.who = await api('GET', '/whoami');
  } catch (e) {
    session.token = null;
    throw e;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  renderShell();
  fleet.start();
  render();
}

let shell = null;

function renderShell() {
  const app = clear(document.getElementById('app'));
  const live = h('span', { class: 'live', 'data-state': 'connecting' }, 'Connecting');
  const nav = h('nav', { class: 'nav' },
    h('a', { href: '#/', 'data-nav': 'fleet' }, 'Fleet'),
    h('a', { href: '#/jobs', 'data-nav': 'jobs' }, 'Jobs'),
    h('a', { href: '#/run', 'data-nav': 'run' }, 'Run'),
    isAdmin() ? h('a', { href: '#/audit', 'data-nav': 'audit' }, 'Audit') : null);
  const header = h('header', { class: 'topbar' },
    h('a', { class: 'brand', href: '#/' }, h('img', { src: '/ui/icon.svg', alt: '' }), 'Muster'),
    nav,
    h('div', { class: 'spacer' }),
    h('div', { class: 'who' },
      live,
      h('span', { class: 'name', title: `token ${session.who.token_id}` }, `${session.who.name} · ${session.who.role}`),
      h('button', { class: 'link', type: 'button', onclick: () => signOut() }, 'Sign out')));
  const main = h('main', { id: 'main' });
  app.append(header, main);
  fleet.stateListeners.clear(); // the previous session's header is gone
  fleet.onState((state) => {
    live.dataset.state = state;
    live.textContent = state === 'live' ? 'Live' : state === 'reconnecting' ? 'Reconnecting…' : 'Connecting…';
  });
  shell = { main, nav };
}

// ---------------------------------------------------------------------------------------------
// Routing: #/ (fleet), #/agents/ID, #/jobs, #/jobs/ID, #/run, #/audit

let unmount = null;

function unmountView() {
  if (unmount) {
    try { unmount(); } catch (e) { console.error(e); }
  }
  unmount = null;
}

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/';
  const [path, query] = raw.split('?');
  return { parts: path.split('/').filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(query || '') };
}

function render() {
  if (!session.token || !shell) return;
  unmountView();
  const { parts, query } = parseHash();
  const main = clear(shell.main);
  let view = fleetView;
  let section = 'fleet';
  let arg = null;
  if (parts[0] === 'agents' && parts[1]) { view = agentView; arg = parts[1]; }
  else if (parts[0] === 'jobs' && parts[1]) { view = jobView; arg = parts[1]; section = 'jobs'; }
  else if (parts[0] === 'jobs') { view = jobsView; section = 'jobs'; }
  else if (parts[0] === 'run') { view = runView; section = 'run'; }
  else if (parts[0] === 'audit') { view = auditView; section = 'audit'; }
  for (const a of shell.nav.querySelectorAll('a')) a.classList.toggle('active', a.dataset.nav === section);
  const cleanups = [];
  // Every "3s ago" the view draws, kept ticking until it leaves the page.
  let ages = [];
  cleanups.push(ticker.add(() => {
    ages = ages.filter(([el]) => el.isConnected);
    for (const [el, ts, prefix] of ages) el.textContent = `${prefix}${ago(ts)}`;
  }));
  const ctx = {
    main, query, arg,
    on: (fn) => cleanups.push(fn),
    subscribe: (fn) => cleanups.push(fleet.subscribe(fn)),
    aged: (ts, prefix = '') => {
      const el = h('span', { title: localTime(ts) }, `${prefix}${ago(ts)}`);
      ages.push([el, ts, prefix]);
      return el;
    },
  };
  unmount = () => { for (const fn of cleanups) fn(); };
  window.scrollTo(0, 0);
  view(ctx).catch((e) => showError(main, e));
}

function showError(main, e) {
  if (e && e.status === 401) return;
  clear(main).append(h('div', { class: 'notice error', role: 'alert' }, e && e.message ? e.message : String(e)));
}

function setQuery(params) {
  const { parts } = parseHash();
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
  const qs = q.toString();
  history.replaceState(null, '', `#/${parts.map(encodeURIComponent).join('/')}${qs ? `?${qs}` : ''}`);
}

// ---------------------------------------------------------------------------------------------
// Fleet

function agentModel(s) {
  const m = s.metrics;
  let disk = null;
  if (m && m.disks) {
    const used = m.disks.reduce((a, d) => a + d.used_bytes, 0);
    const total = m.disks.reduce((a, d) => a + d.total_bytes, 0);
    disk = pct(used, total);
  }
  return {
    id: s.id,
    hostname: s.hostname || '(unnamed)',
    status: s.status,
    status_since: s.status_since,
    labels: s.labels || {},
    trusted_keys: s.trusted_keys || [],
    pending: !!s.pending,
    last_hb: s.last_heartbeat_at,
    cpu: m ? m.cpu_percent : null,
    mem: m ? pct(m.mem_used_bytes, m.mem_total_bytes) : null,
    disk,
  };
}

// Far cheaper than String.localeCompare over ten thousand rows; numeric, so pos-9 < pos-10.
const collator = new Intl.Collator(undefined, { numeric: true });

const SORTS = {
  status: (a, b) => STATUS_RANK[a.status] - STATUS_RANK[b.status],
  hostname: (a, b) => collator.compare(a.hostname, b.hostname),
  heartbeat: (a, b) => (parseTime(b.last_hb) || 0) - (parseTime(a.last_hb) || 0),
  cpu: (a, b) => (b.cpu ?? -1) - (a.cpu ?? -1),
  mem: (a, b) => (b.mem ?? -1) - (a.mem ?? -1),
  disk: (a, b) => (b.disk ?? -1) - (a.disk ?? -1),
};

async function fleetView(ctx) {
  const agents = new Map();
  const filter = {
    status: ctx.query.get('status') || '',
    q: ctx.query.get('q') || '',
    label: ctx.query.get('label') || '',
    labelIds: null,
    labelError: null,
  };
  let sort = { key: 'status', dir: 1 };
  let loaded = false;
  const buffered = [];

  const counters = h('div', { class: 'counters' });
  const search = h('input', { type: 'search', class: 'grow', placeholder: 'Search hostname or ID', value: filter.q, 'aria-label': 'Search' });
  const status = h('select', { 'aria-label': 'Status' },
    h('option', { value: '' }, 'All statuses'),
    ['online', 'stale', 'offline'].map((s) => h('option', { value: s }, s[0].toUpperCase() + s.slice(1))));
  status.value = filter.status;
  const label = h('input', { type: 'text', class: 'grow', placeholder: 'Label selector: site=paris,role in (pos,kiosk)', value: filter.label, 'aria-label': 'Label selector', spellcheck: false });
  const labelError = h('div', { class: 'notice error hidden', role: 'alert' });
  const tbody = h('tbody');
  let shown = PAGE_ROWS;
  const moreText = h('span');
  const more = h('div', { class: 'hint hidden', id: 'more-agents' }, moreText,
    h('button', { class: 'link', type: 'button', onclick: () => { shown += PAGE_ROWS; draw(); } }, `Show ${PAGE_ROWS} more`),
    ', or narrow the search.');
  const headers = [
    ['status', 'Status'], ['hostname', 'Agent'], [null, 'Labels'], ['heartbeat', 'Last heartbeat'],
    ['cpu', 'CPU'], ['mem', 'Memory'], ['disk', 'Disk'],
  ].map(([key, text]) => {
    const th = h('th', { class: key ? 'sortable' : '', scope: 'col' }, text);
    if (key) th.addEventListener('click', () => {
      sort = { key, dir: sort.key === key ? -sort.dir : 1 };
      draw();
    });
    th.dataset.key = key || '';
    return th;
  });
  const table = h('table', { class: 'cards', id: 'agents' }, h('thead', {}, h('tr', {}, headers)), tbody);

  ctx.main.append(
    h('div', { class: 'page-head' }, h('div', { class: 'titles' }, h('h1', {}, 'Fleet'),
      h('div', { class: 'sub' }, 'Every enrolled agent and its health, live.'))),
    counters,
    h('div', { class: 'panel' },
      h('div', { class: 'toolbar' }, search, status, label),
      labelError,
      h('div', { class: 'table-wrap' }, table),
      more));


  function visible() {
    const q = filter.q.trim().toLowerCase();
    return [...agents.values()].filter((a) =>
      (!filter.status || a.status === filter.status)
      && (!filter.labelIds || filter.labelIds.has(a.id))
      && (!q || a.hostname.toLowerCase().includes(q) || a.id.includes(q)));
  }

  function drawCounters() {
    const n = { total: agents.size, online: 0, stale: 0, offline: 0 };
    for (const a of agents.values()) n[a.status] += 1;
    clear(counters).append(...[['', 'Agents', n.total], ['online', 'Online', n.online], ['stale', 'Stale', n.stale], ['offline', 'Offline', n.offline]]
      .map(([s, text, value]) => h('button', {
        class: 'counter', type: 'button', 'data-status': s || 'all', 'aria-pressed': String(filter.status === s),
        onclick: () => { filter.status = s; status.value = s; changed(); },
      }, h('div', { class: 'label' }, text), h('div', { class: 'value' }, String(value)))));
  }

  function draw() {
    drawCounters();
    for (const th of headers) {
      if (th.dataset.key === sort.key) th.setAttribute('aria-sort', sort.dir > 0 ? 'ascending' : 'descending');
      else th.removeAttribute('aria-sort');
    }
    const cmp = SORTS[sort.key];
    const rows = visible().sort((a, b) => cmp(a, b) * sort.dir || collator.compare(a.hostname, b.hostname) || (a.id < b.id ? -1 : 1));
    clear(tbody);
    if (!loaded) {
      tbody.append(h('tr', {}, h('td', { class: 'empty', colspan: 7 }, 'Loading…')));
    } else if (!rows.length) {
      tbody.append(h('tr', {}, h('td', { class: 'empty', colspan: 7 },
        agents.size ? 'No agent matches the filter.' : 'No agents yet. Enroll one with muster enroll-token create --install-command.')));
    }
    for (const a of rows.slice(0, shown)) {
      const age = h('td', { class: 'num', 'data-label': 'Heartbeat' }, ctx.aged(a.last_hb));
      tbody.append(h('tr', { 'data-agent-id': a.id, 'data-status': a.status },
        h('td', { 'data-label': 'Status' }, pill('status', a.status)),
        h('td', { class: 'primary' }, h('a', { class: 'host', href: `#/agents/${encodeURIComponent(a.id)}` }, a.hostname),
          a.trusted_keys.length ? [' ', signedMarker(a.trusted_keys)] : null, a.pending ? [' ', pendingMarker()] : null,
          h('span', { class: 'host-id' }, a.id)),
        h('td', { 'data-label': 'Labels' }, chips(a.labels)),
        age,
        h('td', { 'data-label': 'CPU' }, meter(a.cpu)),
        h('td', { 'data-label': 'Memory' }, meter(a.mem)),
        h('td', { 'data-label': 'Disk' }, meter(a.disk))));
    }
    more.classList.toggle('hidden', rows.length <= shown);
    moreText.textContent = `Showing ${shown} of ${rows.length} matching agents. `;
  }
  // Status changes show within a quarter of a second; heartbeat figures, which for a large
  // fleet arrive hundreds a second, redraw the table at most once a second.
  const redraw = throttled(draw, 250);
  const redrawFigures = throttled(draw, 1000);

  async function loadLabelMatches() {
    filter.labelIds = null;
    filter.labelError = null;
    const sel = filter.label.trim();
    if (sel) {
      try {
        const matched = await api('GET', `/agents?label=${encodeURIComponent(sel)}`);
        filter.labelIds = new Set(matched.map((a) => a.id));
      } catch (e) {
        filter.labelError = e.message;
        filter.labelIds = new Set();
      }
    }
    label.setAttribute('aria-invalid', String(!!filter.labelError));
    labelError.textContent = filter.labelError || '';
    labelError.classList.toggle('hidden', !filter.labelError);
  }

  function changed() {
    setQuery({ status: filter.status, q: filter.q, label: filter.label });
    draw();
  }

  async function load() {
    const [list] = await Promise.all([api('GET', '/agents'), loadLabelMatches()]);
    agents.clear();
    for (const s of list) agents.set(s.id, agentModel(s));
    loaded = true;
    for (const e of buffered.splice(0)) apply(e);
    draw();
  }

  async function fetchAgent(id) {
    try {
      const d = await api('GET', `/agents/${encodeURIComponent(id)}`);
      agents.set(d.id, agentModel(d));
      if (filter.label) await loadLabelMatches();
      redraw();
    } catch (e) { /* revoked meanwhile */ }
  }

  function apply(e) {
    const a = e.agent_id ? agents.get(e.agent_id) : null;
    switch (e.type) {
      case 'agent_status':
        if (!a) { fetchAgent(e.agent_id); return; }
        a.status = e.to;
        a.status_since = e.at;
        break;
      case 'heartbeat':
        if (!a) return;
        a.last_hb = e.at;
        a.cpu = e.cpu_percent;
        a.mem = pct(e.mem_used_bytes, e.mem_total_bytes);
        a.disk = pct(e.disk_used_bytes, e.disk_total_bytes);
        redrawFigures();
        return;
      case 'agent_enrolled':
        fetchAgent(e.agent_id);
        return;
      case 'agent_revoked':
        agents.delete(e.agent_id);
        break;
      case 'resync':
        load().catch((err) => showError(ctx.main, err));
        return;
      default:
        return;
    }
    redraw();
  }

  ctx.subscribe((e) => { if (loaded) apply(e); else buffered.push(e); });
  search.addEventListener('input', () => { filter.q = search.value; changed(); });
  status.addEventListener('change', () => { filter.status = status.value; changed(); });
  label.addEventListener('input', debounced(async () => {
    filter.label = label.value;
    await loadLabelMatches();
    changed();
  }, 300));
  // Heartbeat summaries arrive at most every 15 s per agent; a full reload once a minute keeps
  // every figure honest even if an event was missed.
  const refresh = setInterval(() => { if (!document.hidden) load().catch(() => {}); }, 60000);
  ctx.on(() => clearInterval(refresh));
  draw();
  await load();
}

// ---------------------------------------------------------------------------------------------
// Charts

// Each period with the bucket the server sums it up in (the highest of each figure): about
// 700 points a chart, whatever the heartbeat interval. Heartbeats are kept for 7 days.
const RANGES = [['1h', 3600e3, '5s'], ['6h', 6 * 3600e3, '30s'], ['24h', 24 * 3600e3, '2m'], ['7d', 7 * 24 * 3600e3, '15m']];

function lineChart(title, unit) {
  const now = h('span', { class: 'now' }, '–');
  const box = h('div', { class: 'chart-box' });
  const tip = h('div', { class: 'tip' });
  const el = h('div', { class: 'chart panel' }, h('div', { class: 'head' }, h('h2', {}, title), now), box, tip);
  let points = [];
  let range = RANGES[0][1];
  let gap = 60e3;

  function draw() {
    const width = Math.max(240, box.clientWidth || 600);
    const height = 160;
    const pad = { l: 36, r: 8, t: 8, b: 20 };
    const end = Date.now();
    const start = end - range;
    const x = (t) => pad.l + ((t - start) / range) * (width - pad.l - pad.r);
    const y = (v) => pad.t + (1 - Math.min(100, Math.max(0, v)) / 100) * (height - pad.t - pad.b);
    const shown = downsample(points.filter((p) => p.t >= start), start, range, Math.floor(width - pad.l - pad.r));
    const root = svg('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': `${title} over the last ${RANGES.find((r) => r[1] === range)[0]}` });
    for (const v of [0, 50, 100]) {
      root.append(svg('line', { class: 'grid-line', x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v) }),
        svg('text', { class: 'axis', x: pad.l - 6, y: y(v) + 3, 'text-anchor': 'end' }, `${v}${unit}`));
    }
    for (const [i, t] of [start, start + range / 2, end].entries()) {
      const label = range > 24 * 3600e3
        ? new Date(t).toLocaleDateString([], { month: 'short', day: 'numeric' })
        : new Date(t).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
      root.append(svg('text', { class: 'axis', x: x(t), y: height - 4, 'text-anchor': ['start', 'middle', 'end'][i] }, label));
    }
    let line = '';
    let area = '';
    let run = [];
    const dots = [];
    const flush = () => {
      // A lone sample between gaps has no line to be part of: it shows as a dot.
      if (run.length === 1) dots.push(svg('circle', { class: 'dot', cx: x(run[0].t).toFixed(1), cy: y(run[0].v).toFixed(1), r: 2.5 }));
      if (run.length) {
        line += run.map((p, i) => `${i ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join('');
        area += `M${x(run[0].t).toFixed(1)},${y(0)}${run.map((p) => `L${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join('')}L${x(run[run.length - 1].t).toFixed(1)},${y(0)}Z`;
      }
      run = [];
    };
    for (const p of shown) {
      if (run.length && p.t - run[run.length - 1].t > gap) flush();
      run.push(p);
    }
    flush();
    root.append(svg('path', { class: 'area', d: area || 'M0,0' }), svg('path', { class: 'line', d: line || 'M0,0' }), dots);
    const cursor = svg('line', { class: 'cursor hidden', y1: pad.t, y2: height - pad.b });
    root.append(cursor);
    root.addEventListener('pointermove', (ev) => {
      if (!shown.length) return;
      const rect = root.getBoundingClientRect();
      const px = ((ev.clientX - rect.left) / rect.width) * width;
      const t = start + ((px - pad.l) / (width - pad.l - pad.r)) * range;
      let best = shown[0];
      for (const p of shown) if (Math.abs(p.t - t) < Math.abs(best.t - t)) best = p;
      cursor.setAttribute('x1', x(best.t));
      cursor.setAttribute('x2', x(best.t));
      cursor.classList.remove('hidden');
      tip.textContent = `${new Date(best.t).toLocaleString()} · ${best.v.toFixed(1)}${unit}`;
    });
    root.addEventListener('pointerleave', () => { cursor.classList.add('hidden'); tip.textContent = ''; });
    clear(box).append(root);
    const last = points[points.length - 1];
    now.textContent = last ? `${last.v.toFixed(1)}${unit}` : '–';
    if (!points.length) tip.textContent = 'No heartbeats in this period.';
  }

  const observer = new ResizeObserver(throttled(draw, 100));
  observer.observe(box);
  return {
    el,
    set(next, r, g) { points = next; range = r; gap = g; draw(); },
    push(p) { if (!points.length || p.t > points[points.length - 1].t) points.push(p); draw(); },
    close() { observer.disconnect(); },
  };
}

// At most one point per pixel column: the highest, so short spikes stay visible.
function downsample(points, start, range, columns) {
  if (points.length <= columns || columns <= 0) return points;
  const out = [];
  let col = -1;
  for (const p of points) {
    const c = Math.floor(((p.t - start) / range) * columns);
    if (c !== col) { out.push({ ...p }); col = c; } else if (p.v > out[out.length - 1].v) out[out.length - 1] = { ...p };
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Agent

// An agent's labels: the trusted ones (from its enrollment token, or set here since), which
// targeting uses and operators may change, and the ones the agent reports about itself
// (agent.*), which nobody but the agent changes. Edits go to PATCH /agents/{id}, which checks
// them (keys, values, the token's scope) and answers with the agent; a refusal is shown as the
// server words it. Built once, so a redraw on a heartbeat does not eat what is being typed.
function labelEditor(saved) {
  const REPORTED = 'agent.';
  let agent = null;
  const list = h('div', { class: 'chips', id: 'labels' });
  const reported = h('div', { class: 'chips', id: 'reported-labels' });
  const error = h('div', { class: 'notice error hidden', role: 'alert', id: 'label-error' });
  const input = h('input', { type: 'text', id: 'label-add', class: 'grow', placeholder: 'key=value', spellcheck: false, autocomplete: 'off', 'aria-label': 'New label' });
  const add = h('button', { type: 'submit' }, 'Set label');
  const form = h('form', { class: 'toolbar', novalidate: true }, input, add);
  const el = h('div', { class: 'panel', id: 'label-editor' }, h('h2', {}, 'Labels'), list, error,
    canRun() ? form : null,
    h('p', { class: 'hint' }, canRun()
      ? 'Jobs target these labels; the next job sees a change. Setting a key that exists changes its value.'
      : 'Jobs target these labels. An operator or admin token may change them.'),
    h('div', { class: 'field-label section' }, 'Reported by the agent'), reported,
    h('p', { class: 'hint' }, 'From the agent\'s own config, under agent.: only selectors that name agent. match them, and they cannot be edited here.'));

  async function patch(edit) {
    error.classList.add('hidden');
    try {
      saved(await api('PATCH', `/agents/${encodeURIComponent(agent.id)}`, { labels: edit }));
      return true;
    } catch (e) {
      error.textContent = e.message;
      error.classList.remove('hidden');
      return false;
    }
  }

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const set = {};
    for (const word of input.value.split(/[\s,]+/).filter(Boolean)) {
      const at = word.indexOf('=');
      if (at <= 0) {
        error.textContent = `${word}: type a label as key=value`;
        error.classList.remove('hidden');
        return;
      }
      set[word.slice(0, at)] = word.slice(at + 1);
    }
    if (!Object.keys(set).length) return;
    add.disabled = true;
    if (await patch({ set })) input.value = '';
    add.disabled = false;
  });

  function draw(a) {
    agent = a;
    const entries = Object.entries(a.labels || {});
    const trusted = entries.filter(([k]) => !k.startsWith(REPORTED));
    const own = entries.filter(([k]) => k.startsWith(REPORTED));
    append(clear(list), [trusted.length ? trusted.map(([k, v]) => h('span', { class: 'chip', 'data-key': k }, `${k}=${v}`,
      canRun() ? h('button', { type: 'button', class: 'remove', title: `Remove ${k}`, 'aria-label': `Remove label ${k}`, onclick: () => patch({ remove: [k] }) }, '×') : null))
      : h('span', { class: 'muted' }, 'No labels.')]);
    append(clear(reported), [own.length ? own.map(([k, v]) => h('span', { class: 'chip', 'data-key': k }, `${k}=${v}`)) : h('span', { class: 'muted' }, 'None.')]);
  }

  return { el, draw };
}

async function agentView(ctx) {
  const id = ctx.arg;
  let detail = await api('GET', `/agents/${encodeURIComponent(id)}`);
  let rangeIdx = 0;
  let samples = [];
  const charts = { cpu: lineChart('CPU', '%'), mem: lineChart('Memory', '%'), disk: lineChart('Disk', '%') };
  ctx.on(() => Object.values(charts).forEach((c) => c.close()));

  const head = h('div', { class: 'page-head' });
  const facts = h('div', { class: 'grid cols-3' });
  const rangeButtons = RANGES.map(([name], i) => h('button', { type: 'button', 'aria-pressed': String(i === 0), onclick: () => setRange(i) }, name));
  const transitions = h('div', { class: 'panel' });
  const runs = h('div', { class: 'panel' });
  // A label edit answers with the agent; a reload that was asked before it would undo it on
  // screen, so such an answer is dropped.
  let edits = 0;
  const labels = labelEditor((next) => { edits += 1; detail = next; drawDetail(); });
  const trust = h('div', { class: 'panel', id: 'trust' });
  const identity = h('div', { id: 'identity' });
  ctx.main.append(head, identity, facts, h('div', { class: 'grid cols-2 section' }, labels.el, trust),
    h('div', { class: 'section toolbar' }, h('h2', { class: 'spacer' }, 'Health over time'), h('div', { class: 'range', role: 'group', 'aria-label': 'Period' }, rangeButtons)),
    h('div', { class: 'grid cols-3' }, charts.cpu.el, charts.mem.el, charts.disk.el),
    h('div', { class: 'grid cols-2 section' }, transitions, runs));

  const { aged } = ctx;

  function drawDetail() {
    const s = detail;
    const m = s.metrics;
    const actions = h('div', { class: 'actions' });
    if (canRun()) actions.append(h('a', { class: 'button primary', href: `#/run?agent=${encodeURIComponent(s.id)}` }, 'Run a command'));
    if (isAdmin() && s.pending) {
      actions.append(h('button', { type: 'button', class: 'primary', id: 'accept-agent', onclick: (ev) => act(ev, 'accept', null) }, 'Accept agent'));
    }
    if (isAdmin()) {
      actions.append(h('button', { type: 'button', id: 'rotate-credential', onclick: (ev) => act(ev, 'rotate-credential',
        'Rotate this agent\'s credential? It gets a new one now (or when it next connects); the old one stops working, and a copy of it presented later is reported as a clone.') }, 'Rotate credential'));
    }
    const notes = [];
    if (s.pending) {
      notes.push(h('div', { class: 'notice warn', role: 'status', id: 'pending-notice' },
        'Waiting for approval: this agent enrolled with an approve token. It reports its health but gets no runs until an admin accepts it.'));
    }
    if (s.clone_seen) {
      notes.push(h('div', { class: 'notice error', role: 'alert', id: 'clone-notice' },
        `A credential this agent gave up in a rotation was presented from ${s.clone_seen.from_addr} ${ago(s.clone_seen.at)}: a copy of this machine (a cloned image, a copied state directory) exists somewhere. It was refused.`));
    }
    append(clear(identity), notes);
    clear(head).append(
      h('div', { class: 'titles' },
        h('h1', {}, s.hostname || '(unnamed)', ' ', pill('status', s.status), (s.trusted_keys || []).length ? [' ', signedMarker(s.trusted_keys)] : null,
          s.pending ? [' ', pendingMarker()] : null),
        h('div', { class: 'sub' }, h('span', { class: 'mono' }, s.id), ' · ', s.status, ' ', aged(s.status_since, 'since '))),
      actions);
    const system = h('dl', { class: 'kv' },
      h('dt', {}, 'System'), h('dd', {}, m ? `${m.os} ${m.kernel} (${m.arch})` : '–'),
      h('dt', {}, 'Uptime'), h('dd', {}, m ? duration(m.uptime_secs * 1000) : '–'),
      h('dt', {}, 'Agent'), h('dd', {}, s.agent_version || '–'),
      h('dt', {}, 'Enrolled'), h('dd', {}, localTime(s.enrolled_at)),
      h('dt', {}, 'Credential'), h('dd', { id: 'credential-issued' }, 'issued ', aged(s.credential_issued_at),
        s.rotation_requested_at ? ' · rotation requested' : ''),
      h('dt', {}, 'Heartbeat'), h('dd', {}, aged(s.last_heartbeat_at), s.heartbeat_interval_ms ? ` (every ${duration(s.heartbeat_interval_ms)})` : ''));
    const c = s.connection;
    const conn = h('dl', { class: 'kv' },
      h('dt', {}, 'Connection'), h('dd', {}, c ? (c.connected ? 'connected' : 'disconnected') : 'never connected'),
      c && [h('dt', {}, 'From'), h('dd', { class: 'mono' }, c.remote_addr),
        h('dt', {}, 'Server'), h('dd', {}, c.node),
        h('dt', {}, c.connected ? 'Since' : 'Until'), h('dd', {}, aged(c.connected ? c.connected_at : c.disconnected_at))]);
    const usage = h('dl', { class: 'kv' },
      h('dt', {}, 'CPU'), h('dd', {}, m ? `${m.cpu_percent.toFixed(1)}% · load ${m.load_avg.map((l) => l.toFixed(2)).join(' ')}` : '–'),
      h('dt', {}, 'Memory'), h('dd', {}, m ? `${bytes(m.mem_used_bytes)} of ${bytes(m.mem_total_bytes)}` : '–'),
      (m ? m.disks : []).map((d) => [h('dt', {}, h('span', { class: 'mono' }, d.mount)), h('dd', {}, `${bytes(d.used_bytes)} of ${bytes(d.total_bytes)} (${d.fs_type})`)]),
      h('dt', {}, 'Processes'), h('dd', {}, m ? String(m.process_count) : '–'));
    clear(facts).append(
      h('div', { class: 'panel' }, h('h2', {}, 'Machine'), system),
      h('div', { class: 'panel' }, h('h2', {}, 'Connection'), conn),
      h('div', { class: 'panel' }, h('h2', {}, 'Latest metrics'), usage));
    labels.draw(s);
    const keys = s.trusted_keys || [];
    append(clear(trust), [h('h2', {}, 'Signed jobs'),
      keys.length ? [
        h('p', { id: 'signed-required' }, h('strong', {}, 'Required.'),
          ` This agent runs only jobs signed by ${keys.length === 1 ? 'this key' : 'one of these keys'}; an unsigned job fails on it.`),
        h('ul', { class: 'keys' }, keys.map((k) => h('li', {}, h('code', { class: 'key' }, k)))),
        h('p', { class: 'hint' }, 'Its own agent.toml says so (trusted_keys), and the server cannot change it. Send jobs for it with muster run, which signs them.')]
        : h('p', { class: 'muted', id: 'signed-required' }, 'Not required: this agent trusts no keys and runs unsigned jobs.')]);
    clear(transitions).append(h('h2', {}, 'Status changes'),
      s.transitions.length ? h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, h('th', {}, 'When'), h('th', {}, 'Change'), h('th', {}, 'Reason'))),
        h('tbody', {}, s.transitions.map((t) => h('tr', {},
          h('td', { class: 'num' }, aged(t.at)),
          h('td', {}, t.from ? [pill('status', t.from), ' → '] : '', pill('status', t.to)),
          h('td', {}, t.reason))))))
        : h('p', { class: 'muted' }, 'No changes recorded.'));
  }

  // An admin action on the agent, which answers with the agent as it is now.
  async function act(ev, action, question) {
    if (question && !window.confirm(question)) return;
    ev.target.disabled = true;
    try {
      edits += 1;
      detail = await api('POST', `/agents/${encodeURIComponent(id)}/${action}`);
      drawDetail();
    } catch (e) {
      ev.target.disabled = false;
      identity.prepend(h('div', { class: 'notice error', role: 'alert' }, e.message));
    }
  }

  async function loadRuns() {
    const list = await api('GET', `/agents/${encodeURIComponent(id)}/runs?limit=20`);
    clear(runs).append(h('h2', {}, 'Recent runs'),
      list.length ? h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, h('th', {}, 'Command'), h('th', {}, 'State'), h('th', {}, 'When'))),
        h('tbody', {}, list.map((r) => h('tr', {},
          h('td', {}, h('a', { class: 'mono', href: `#/jobs/${encodeURIComponent(r.job_id)}` }, commandText(r.command))),
          h('td', {}, pill('state', r.state), ' ', h('span', { class: 'muted' }, exitText(r))),
          h('td', { class: 'num' }, aged(r.created_at)))))))
        : h('p', { class: 'muted' }, 'This agent has not been sent any command yet.'));
  }

  function toSample(t, cpu, memUsed, memTotal, diskUsed, diskTotal) {
    return { t, cpu, mem: pct(memUsed, memTotal), disk: pct(diskUsed, diskTotal) };
  }

  function drawCharts() {
    const [, range, step] = RANGES[rangeIdx];
    // A gap wider than this is time the agent was away: the line breaks there.
    const gap = Math.max(3 * (detail.heartbeat_interval_ms || 10000), 2 * parseStep(step), 30000);
    for (const key of ['cpu', 'mem', 'disk']) {
      charts[key].set(samples.filter((s) => s[key] !== null).map((s) => ({ t: s.t, v: s[key] })), range, gap);
    }
  }

  async function loadHistory() {
    const [, range, step] = RANGES[rangeIdx];
    const since = new Date(Date.now() - range).toISOString();
    const list = await api('GET', `/agents/${encodeURIComponent(id)}/heartbeats?since=${encodeURIComponent(since)}&step=${step}&limit=10000`);
    samples = list.map((s) => toSample(parseTime(s.at), s.cpu_percent, s.mem_used_bytes, s.mem_total_bytes, s.disk_used_bytes, s.disk_total_bytes));
    drawCharts();
  }

  function setRange(i) {
    rangeIdx = i;
    rangeButtons.forEach((b, j) => b.setAttribute('aria-pressed', String(i === j)));
    loadHistory().catch((e) => showError(ctx.main, e));
  }

  const reloadDetail = throttled(async () => {
    const asked = edits;
    try {
      const next = await api('GET', `/agents/${encodeURIComponent(id)}`);
      if (asked === edits) { detail = next; drawDetail(); }
    } catch (e) { /* shown on next load */ }
  }, 500);
  const reloadRuns = throttled(() => loadRuns().catch(() => {}), 2000);

  ctx.subscribe((e) => {
    if (e.type === 'resync') { reloadDetail(); reloadRuns(); loadHistory().catch(() => {}); return; }
    if (e.type === 'job_created' || e.type === 'job_finished' || e.type === 'job_progress') { reloadRuns(); return; }
    if (e.agent_id !== id) return;
    if (e.type === 'agent_status') {
      detail.status = e.to;
      detail.status_since = e.at;
      drawDetail();
      reloadDetail();
    } else if (e.type === 'heartbeat') {
      const s = toSample(parseTime(e.at), e.cpu_percent, e.mem_used_bytes, e.mem_total_bytes, e.disk_used_bytes, e.disk_total_bytes);
      if (!samples.length || s.t > samples[samples.length - 1].t) samples.push(s);
      detail.last_heartbeat_at = e.at;
      drawCharts();
      reloadDetail();
    } else if (e.type === 'agent_revoked') {
      ctx.main.prepend(h('div', { class: 'notice error', role: 'alert' }, 'This agent was revoked: its credential no longer works.'));
    } else if (e.type === 'agent_accepted' || e.type === 'clone_suspected') {
      reloadDetail();
    }
  });

  drawDetail();
  await Promise.all([loadHistory(), loadRuns()]);
}

// ---------------------------------------------------------------------------------------------
// Jobs

function countsBar(counts, total) {
  const bar = h('div', { class: 'progress', title: countsText(counts) });
  for (const s of STATE_ORDER) {
    const n = counts[s] || 0;
    if (!n || s === 'pending') continue;
    const seg = h('span', { class: s });
    seg.style.width = `${(n / Math.max(1, total)) * 100}%`;
    bar.append(seg);
  }
  return bar;
}

function countsText(counts) {
  return STATE_ORDER.filter((s) => counts[s]).map((s) => `${counts[s]} ${s.replace('_', ' ')}`).join(', ') || 'no runs';
}

function jobModel(j) {
  return {
    id: j.id,
    command: commandText(j.command),
    target: targetText(j.target),
    created_by: j.created_by,
    created_at: j.created_at,
    total: j.total,
    counts: j.counts || {},
    status: j.status,
    failed: j.failed || 0,
  };
}

// The server decides a job's status and what counts as failed (shared::job::JobStatus); the
// page only shows it.
function jobStatus(j) {
  const done = Object.entries(j.counts).filter(([s]) => FINAL_STATES.has(s)).reduce((a, [, n]) => a + n, 0);
  switch (j.status) {
    case 'awaiting_approval': return pill('state', 'pending', 'awaiting approval');
    case 'running': return h('span', {}, pill('state', 'running', `running ${done}/${j.total}`));
    case 'failed': return pill('state', 'failed', `${j.failed} failed`);
    case 'cancelled': return pill('state', 'cancelled');
    default: return pill('state', 'succeeded');
  }
}

async function jobsView(ctx) {
  const jobs = new Map();
  const tbody = h('tbody');
  ctx.main.append(
    h('div', { class: 'page-head' },
      h('div', { class: 'titles' }, h('h1', {}, 'Jobs'), h('div', { class: 'sub' }, 'Commands sent to the fleet, newest first.')),
      canRun() ? h('div', { class: 'actions' }, h('a', { class: 'button primary', href: '#/run' }, 'Run a command')) : null),
    h('div', { class: 'panel' }, h('div', { class: 'table-wrap' }, h('table', { class: 'cards', id: 'jobs' },
      h('thead', {}, h('tr', {}, ['Command', 'Target', 'Progress', 'Status', 'By', 'Created'].map((t) => h('th', {}, t)))),
      tbody))));

  function draw() {
    clear(tbody);
    const list = [...jobs.values()].sort((a, b) => parseTime(b.created_at) - parseTime(a.created_at));
    if (!list.length) tbody.append(h('tr', {}, h('td', { class: 'empty', colspan: 6 }, 'No jobs yet.')));
    for (const j of list) {
      const created = h('td', { class: 'num', 'data-label': 'Created' }, ctx.aged(j.created_at));
      tbody.append(h('tr', { 'data-job-id': j.id },
        h('td', { class: 'primary' }, h('a', { class: 'mono', href: `#/jobs/${encodeURIComponent(j.id)}` }, j.command)),
        h('td', { 'data-label': 'Target' }, j.target),
        h('td', { 'data-label': 'Progress' }, countsBar(j.counts, j.total)),
        h('td', { 'data-label': 'Status' }, jobStatus(j)),
        h('td', { 'data-label': 'By' }, j.created_by),
        created));
    }
  }
  const redraw = throttled(draw, 250);

  async function load() {
    const list = await api('GET', '/jobs?limit=100');
    jobs.clear();
    for (const j of list) jobs.set(j.id, jobModel(j));
    draw();
  }

  ctx.subscribe((e) => {
    if (e.type === 'job_created') {
      jobs.set(e.job_id, { id: e.job_id, command: e.command, target: e.target, created_by: e.created_by, created_at: e.at, total: e.total, counts: { pending: e.total }, status: e.status, failed: 0 });
    } else if (e.type === 'job_progress' || e.type === 'job_finished') {
      const j = jobs.get(e.job_id);
      if (!j) return;
      j.counts = e.counts;
      j.status = e.status;
      j.failed = e.failed;
    } else if (e.type === 'resync') {
      load().catch(() => {});
      return;
    } else {
      return;
    }
    redraw();
  });
  await load();
}

// Output of one run, kept by byte offset so repeated or overlapping chunks apply once.
const encoder = new TextEncoder();
const decoder = new TextDecoder();

function appendAt(run, stream, offset, data) {
  const lenKey = `${stream}_bytes`;
  const have = run[lenKey] ?? encoder.encode(run[stream] || '').length;
  const chunk = encoder.encode(data);
  if (offset > have) return false;
  if (offset + chunk.length <= have) return true;
  run[stream] = (run[stream] || '') + decoder.decode(chunk.subarray(have - offset));
  run[lenKey] = offset + chunk.length;
  return true;
}

async function jobView(ctx) {
  const id = ctx.arg;
  let job = null;
  const runs = new Map();
  let finished = false;
  const open = new Set();
  const ctl = new AbortController();
  ctx.on(() => ctl.abort());

  const head = h('div', { class: 'page-head' });
  const summary = h('div', { class: 'panel' });
  const groups = h('div', { class: 'panel section' });
  const table = h('div', { class: 'panel section' });
  const notice = h('div', { class: 'notice hidden', role: 'status' });
  ctx.main.append(notice, head, summary, groups, table);

  function drawHead() {
    const actions = h('div', { class: 'actions' });
    if (canRun() && !finished) {
      actions.append(h('button', { class: 'danger', type: 'button', onclick: async (ev) => {
        if (!window.confirm('Cancel this job? Runs not started end cancelled; running commands are stopped.')) return;
        ev.target.disabled = true;
        try { await api('POST', `/jobs/${encodeURIComponent(id)}/cancel`); } catch (e) { ev.target.disabled = false; flash(e.message, true); }
      } }, 'Cancel job'));
    }
    const awaiting = !finished && !job.cancelled_at && job.approval && !job.approval.approved_by;
    if (awaiting && isAdmin()) {
      actions.prepend(h('button', { class: 'primary', type: 'button', id: 'approve-job', onclick: async (ev) => {
        if (!window.confirm(`Approve this job? It runs on ${plural(job.total, 'agent', 'agents')} as soon as you do.`)) return;
        ev.target.disabled = true;
        try {
          const approved = await api('POST', `/jobs/${encodeURIComponent(id)}/approve`);
          job = { ...job, approval: approved.approval };
          notice.classList.add('hidden');
          drawHead();
        } catch (e) { ev.target.disabled = false; flash(e.message, true); }
      } }, 'Approve'));
    }
    if (awaiting) {
      flash(`This job matches more agents than the server runs on one admin's word: nothing runs until an admin other than ${job.created_by} approves it (muster job approve ${job.id}).`);
    }
    if (canRun()) actions.append(h('a', { class: 'button', href: `#/run?${rerunQuery(job)}` }, 'Run again'));
    clear(head).append(h('div', { class: 'titles' },
      h('div', { class: 'muted small' }, `Job ${job.id}`),
      h('div', { class: 'command', id: 'job-command' }, job.command.program.shell !== undefined
        ? [h('span', { class: 'muted' }, 'sh -c '), job.command.program.shell]
        : commandText(job.command)),
      h('div', { class: 'sub' }, `${targetText(job.target)} · by ${job.created_by} · ${localTime(job.created_at)} · timeout ${duration(job.timeout_secs * 1000)}`)),
    actions);
  }

  function flash(text, error) {
    notice.textContent = text;
    notice.classList.toggle('error', !!error);
    notice.classList.remove('hidden');
  }

  function counts() {
    const c = {};
    for (const r of runs.values()) c[r.state] = (c[r.state] || 0) + 1;
    return c;
  }

  function draw() {
    if (!job) return;
    drawHead();
    const c = counts();
    const total = runs.size;
    const done = [...runs.values()].filter((r) => FINAL_STATES.has(r.state)).length;
    clear(summary).append(
      h('div', { class: 'toolbar' },
        h('h2', { class: 'spacer' }, finished ? `Finished: ${done} of ${plural(total, 'run')}` : `Running: ${done} of ${total} done`),
        h('div', { class: 'counts' }, STATE_ORDER.filter((s) => c[s]).map((s) => pill('state', s, `${c[s]} ${s.replace('_', ' ')}`)))),
      countsBar(c, total));

    // Identical results grouped: same state, exit and output.
    const byKey = new Map();
    for (const r of runs.values()) {
      const key = JSON.stringify([r.state, r.exit_code, r.signal, r.error, r.stdout, r.stderr]);
      if (!byKey.has(key)) byKey.set(key, []);
      byKey.get(key).push(r);
    }
    const sorted = [...byKey.values()].sort((a, b) => b.length - a.length);
    clear(groups).append(h('h2', {}, 'Results'), ...sorted.map((rs) => {
      const r = rs[0];
      const names = rs.map((x) => x.hostname || x.agent_id);
      const hosts = names.length > 12 ? `${names.slice(0, 12).join(', ')} and ${names.length - 12} more` : names.join(', ');
      return h('div', { class: 'group', 'data-state': r.state },
        h('div', { class: 'group-head' }, pill('state', r.state), h('strong', {}, plural(rs.length, 'agent')), h('span', { class: 'muted' }, exitText(r)), r.error ? h('span', { class: 'muted' }, r.error) : null),
        h('div', { class: 'group-hosts' }, hosts),
        output(r));
    }));

    const all = [...runs.values()];
    const rows = all.slice(0, MAX_ROWS);
    const cut = all.length > MAX_ROWS
      ? h('div', { class: 'hint' }, `Showing the first ${MAX_ROWS} of ${all.length} runs; `, h('code', {}, `muster job ${id} --json`), ' has them all.')
      : null;
    append(clear(table), [h('h2', {}, 'Runs'), cut, h('div', { class: 'table-wrap' }, h('table', { class: 'cards', id: 'runs' },
      h('thead', {}, h('tr', {}, ['Agent', 'State', 'Exit', 'Started', 'Took', ''].map((t) => h('th', {}, t)))),
      h('tbody', {}, rows.map((r) => {
        const took = r.started_at && r.finished_at ? duration(parseTime(r.finished_at) - parseTime(r.started_at)) : r.started_at ? 'running' : '–';
        const toggle = () => { if (open.has(r.id)) open.delete(r.id); else open.add(r.id); draw(); };
        const row = h('tr', { class: 'expandable', 'data-run-id': r.id, 'data-agent-id': r.agent_id, 'data-state': r.state, onclick: (ev) => { if (ev.target.tagName !== 'A') toggle(); } },
          h('td', { class: 'primary' }, h('a', { class: 'host', href: `#/agents/${encodeURIComponent(r.agent_id)}` }, r.hostname || r.agent_id), h('span', { class: 'host-id' }, r.agent_id)),
          h('td', { 'data-label': 'State' }, pill('state', r.state)),
          h('td', { class: 'num', 'data-label': 'Exit' }, exitText(r) || '–'),
          h('td', { class: 'num', 'data-label': 'Started' }, r.started_at ? new Date(parseTime(r.started_at)).toLocaleTimeString() : '–'),
          h('td', { class: 'num', 'data-label': 'Took' }, took),
          h('td', {}, h('button', { class: 'link', type: 'button', 'aria-expanded': String(open.has(r.id)) }, open.has(r.id) ? 'Hide output' : 'Output')));
        return open.has(r.id) ? [row, h('tr', { class: 'detail' }, h('td', { colspan: 6 }, r.error ? h('div', { class: 'muted' }, r.error) : null, output(r)))] : row;
      }))))]);
  }
  const redraw = throttled(draw, 150);

  function output(r) {
    if (!r.stdout && !r.stderr) {
      return h('pre', { class: 'output' }, FINAL_STATES.has(r.state) ? '(no output)' : '(no output yet)');
    }
    // The job's detail carries the head of each stream; the rest is paged from /runs/{id}/output.
    const held = (text) => new TextEncoder().encode(text || '').length;
    const more = (r.stdout_len || 0) - held(r.stdout) + (r.stderr_len || 0) - held(r.stderr);
    return h('pre', { class: 'output' }, r.stdout || '', r.stderr ? h('span', { class: 'err' }, r.stderr) : null,
      more > 0 ? h('span', { class: 'muted' }, `\n[${more} more bytes: muster job ${job.id}, or GET /api/v1/runs/${r.id}/output]`) : null,
      r.stdout_truncated || r.stderr_truncated ? h('span', { class: 'err' }, '\n[output truncated at the job\'s limit]') : null);
  }

  function snapshot(d) {
    job = d;
    finished = !!d.finished_at;
    runs.clear();
    for (const r of d.runs) runs.set(r.id, { ...r });
  }

  function apply(e) {
    switch (e.type) {
      case 'snapshot':
        snapshot(e);
        break;
      case 'run': {
        const r = runs.get(e.run_id);
        if (!r) return;
        // A run leaves pending for dispatch only once the job is approved.
        if (e.state === 'dispatched' && job.approval && !job.approval.approved_by) {
          job = { ...job, approval: { ...job.approval, approved_by: 'another admin' } };
          notice.classList.add('hidden');
        }
        r.state = e.state;
        if (e.exit_code !== null && e.exit_code !== undefined) r.exit_code = e.exit_code;
        if (e.error) r.error = e.error;
        if (e.state === 'running' && !r.started_at) r.started_at = new Date().toISOString();
        if (FINAL_STATES.has(e.state) && !r.finished_at) r.finished_at = new Date().toISOString();
        break;
      }
      case 'output': {
        const r = runs.get(e.run_id);
        if (!r) return;
        if (!appendAt(r, e.stream, e.offset, e.data)) needSnapshot = true;
        break;
      }
      case 'finished':
        finished = true;
        // The final snapshot carries exact times and exit codes.
        api('GET', `/jobs/${encodeURIComponent(id)}`).then((d) => { snapshot(d); redraw(); }).catch(() => {});
        break;
      case 'resync':
        needSnapshot = true;
        break;
      default:
        return;
    }
    redraw();
  }

  let needSnapshot = false;
  let ceiling = 1000;
  let first = true;
  while (!ctl.signal.aborted && !finished) {
    try {
      const res = await fetch(`/api/v1/jobs/${encodeURIComponent(id)}/events`, { headers: authHeaders(), signal: ctl.signal, cache: 'no-store' });
      if (res.status === 401) { signOut('The server refused the token.'); return; }
      if (!res.ok) {
        let message = `${res.status} ${res.statusText}`;
        try { message = (await res.json()).message || message; } catch (e) { /* keep the status */ }
        throw new ApiError(res.status, null, message);
      }
      notice.classList.add('hidden');
      for await (const ev of readEvents(res)) {
        let data;
        try { data = JSON.parse(ev.data); } catch (e) { continue; }
        apply(data);
        if (needSnapshot) break;
      }
      ceiling = 1000;
      if (!finished && !needSnapshot && !ctl.signal.aborted) {
        // The server closed the stream (a restart, say): come back for a fresh snapshot.
        flash('The server closed the live stream; reconnecting…');
        await sleep(nextDelay(ceiling), ctl.signal);
      }
      needSnapshot = false;
    } catch (e) {
      if (ctl.signal.aborted) return;
      if (e instanceof ApiError && e.status >= 400 && e.status < 500) {
        if (first) throw e;
        flash(e.message, true);
        return;
      }
      flash('Lost the live connection to the server; reconnecting…');
      await sleep(nextDelay(ceiling), ctl.signal);
      ceiling = Math.min(ceiling * 2, 30000);
    }
    first = false;
  }
}

function rerunQuery(job) {
  const q = new URLSearchParams();
  if (job.target === 'all') q.set('all', '1');
  else if (job.target.selector !== undefined) q.set('selector', job.target.selector);
  else if (job.target.agents) q.set('agent', job.target.agents.join(','));
  if (job.command.program.shell !== undefined) q.set('shell', job.command.program.shell);
  else q.set('argv', JSON.stringify(job.command.program.argv));
  return q.toString();
}

// ---------------------------------------------------------------------------------------------
// Run

// Splits a command line into words the way a POSIX shell would for plain words, quotes and
// backslashes; nothing is expanded.
function splitWords(line) {
  const words = [];
  let cur = null;
  let quote = null;
  for (let i = 0; i < line.length; i += 1) {
    const c = line[i];
    if (quote === "'") {
      if (c === "'") quote = null; else cur += c;
    } else if (quote === '"') {
      if (c === '"') quote = null;
      else if (c === '\\' && i + 1 < line.length && '"\\$`'.includes(line[i + 1])) { cur += line[i + 1]; i += 1; }
      else cur += c;
    } else if (/\s/.test(c)) {
      if (cur !== null) { words.push(cur); cur = null; }
    } else if (c === "'" || c === '"') {
      quote = c;
      cur = cur ?? '';
    } else if (c === '\\' && i + 1 < line.length) {
      cur = (cur ?? '') + line[i + 1];
      i += 1;
    } else {
      cur = (cur ?? '') + c;
    }
  }
  if (quote) throw new Error(`unclosed ${quote} quote`);
  if (cur !== null) words.push(cur);
  return words;
}

// One word for a POSIX shell: as it is when it holds nothing the shell would act on, otherwise
// in single quotes (inside which nothing is special but the quote itself).
function shellQuote(word) {
  if (/^[A-Za-z0-9_\/.=:,@%+-]+$/.test(word)) return word;
  return `'${word.replace(/'/g, "'\\''")}'`;
}

// The `muster run` command line that sends the request the form holds: the CLI signs it with
// the operator's own key, which this page never holds (docs/trust.md).
function cliCommand(req) {
  const words = ['muster', 'run'];
  if (req.target === 'all') words.push('--all');
  else if (req.target.selector !== undefined) words.push('--label', req.target.selector);
  else for (const id of req.target.agents) words.push('--agent', id);
  if (req.timeout_secs !== undefined) words.push('--timeout', `${req.timeout_secs}s`);
  if (req.ttl_secs !== undefined) words.push('--ttl', `${req.ttl_secs}s`);
  if (req.concurrency !== undefined) words.push('--concurrency', req.concurrency);
  if (req.max_errors !== undefined) words.push('--max-errors', String(req.max_errors));
  const program = req.command.program;
  if (program.shell !== undefined) words.push('--shell', '--', program.shell);
  else words.push('--', ...program.argv);
  return words.map(shellQuote).join(' ');
}

// The distinct keys the agents that require signatures trust, in the order first seen.
function trustedKeys(agents) {
  return [...new Set(agents.flatMap((a) => a.trusted_keys || []))];
}

async function runView(ctx) {
  const q = ctx.query;
  const kind = q.get('agent') ? 'agents' : q.get('selector') !== null ? 'selector' : 'all';
  const radios = ['all', 'selector', 'agents'].map((value) => h('input', { type: 'radio', name: 'target', value, checked: value === kind }));
  const targetInput = h('input', { type: 'text', id: 'target', spellcheck: false, autocomplete: 'off' });
  targetInput.value = q.get('agent') || q.get('selector') || '';
  const targetHint = h('div', { class: 'hint' });
  const targetField = h('label', { class: 'field' }, h('span', { id: 'target-label' }, 'Target'), targetInput, targetHint);
  let argv = null;
  try { argv = q.get('argv') ? JSON.parse(q.get('argv')) : null; } catch (e) { argv = null; }
  const command = h('textarea', { id: 'command', rows: 3, spellcheck: false, placeholder: 'uptime', required: true });
  command.value = q.get('shell') ?? (Array.isArray(argv) ? argv.map((w) => (/^[\w./=:,@%+-]+$/.test(w) ? w : `'${w.replace(/'/g, "'\\''")}'`)).join(' ') : '');
  const useShell = h('input', { type: 'checkbox', id: 'shell', checked: !argv });
  const num = (id, label, placeholder, hint) => {
    const input = h('input', { type: 'text', id, inputMode: 'numeric', placeholder });
    return [input, h('label', { class: 'field' }, h('span', {}, label), input, h('div', { class: 'hint' }, hint))];
  };
  const [timeout, timeoutField] = num('timeout', 'Timeout (s)', '60', 'Killed after this long.');
  const [ttl, ttlField] = num('ttl', 'Wait for offline agents (s)', '600', 'Runs still waiting then expire.');
  const [concurrency, concurrencyField] = num('concurrency', 'Concurrency', 'all at once', 'Runs at a time: 10 or 25%.');
  const [maxErrors, maxErrorsField] = num('max-errors', 'Stop after errors', 'never', 'Skip the rest after this many failures.');
  const preview = h('div', { class: 'preview', id: 'preview', 'aria-live': 'polite' });
  const error = h('div', { class: 'notice error hidden', role: 'alert' });
  const submit = h('button', { class: 'primary', type: 'submit', id: 'run', disabled: true }, 'Run');
  // Sending unsigned to agents that accept only signed jobs fails there: it takes a tick.
  const unsignedOk = h('input', { type: 'checkbox', id: 'unsigned-ok' });
  const signing = h('div', { class: 'notice warn hidden', id: 'signatures', role: 'status' });
  let signedOnly = 0;
  let signedKey = '';
  const form = h('form', { class: 'panel', novalidate: true },
    h('div', { class: 'field-label' }, 'Send to'),
    h('div', { class: 'choices' },
      h('label', {}, radios[0], 'All agents'),
      h('label', {}, radios[1], 'Agents matching labels'),
      h('label', {}, radios[2], 'Agents by ID')),
    targetField,
    h('label', { class: 'field' }, h('span', {}, 'Command'), command),
    h('div', { class: 'choices' }, h('label', {}, useShell, 'Run through the shell (', h('code', {}, 'sh -c'), ')')),
    h('details', {}, h('summary', {}, 'Options'), h('div', { class: 'options' }, timeoutField, ttlField, concurrencyField, maxErrorsField)),
    error,
    signing,
    h('div', { class: 'toolbar' }, submit, h('span', { class: 'muted small' }, 'The command is stored first, then sent; each agent runs it once.')),
    preview);

  append(ctx.main, [
    h('div', { class: 'page-head' }, h('div', { class: 'titles' }, h('h1', {}, 'Run a command'),
      h('div', { class: 'sub' }, 'See which agents a command will reach before you send it.'))),
    canRun() ? null : h('div', { class: 'notice error', role: 'alert' }, `Your token has the ${session.who.role} role: it can look, but not run commands. Sign in with an operator or admin token to run one.`),
    form]);

  function targetKind() {
    return radios.find((r) => r.checked).value;
  }

  function syncTarget() {
    const k = targetKind();
    targetField.classList.toggle('hidden', k === 'all');
    if (k === 'selector') {
      targetInput.placeholder = 'site=paris,role in (pos,kiosk),!canary';
      targetHint.textContent = 'Label selector: key=value, key!=value, key in (a,b), key, !key; commas mean and.';
    } else {
      targetInput.placeholder = '0b05e59e04261133';
      targetHint.textContent = 'Agent IDs, separated by commas or spaces. Each agent page has a Run a command button.';
    }
  }

  function optionalNumber(input, name) {
    const v = input.value.trim();
    if (!v) return undefined;
    if (!/^\d+$/.test(v)) throw new Error(`${name} must be a whole number`);
    return Number(v);
  }

  // The request as typed, or an error saying what is missing.
  function request() {
    const k = targetKind();
    let target = 'all';
    if (k === 'selector') {
      if (!targetInput.value.trim()) throw new Error('Type a label selector.');
      target = { selector: targetInput.value.trim() };
    } else if (k === 'agents') {
      const ids = targetInput.value.split(/[\s,]+/).filter(Boolean);
      if (!ids.length) throw new Error('Type at least one agent ID.');
      target = { agents: ids };
    }
    const text = command.value.trim();
    if (!text) throw new Error('Type a command.');
    const program = useShell.checked ? { shell: text } : { argv: splitWords(text) };
    const req = { target, command: { program } };
    const t = optionalNumber(timeout, 'Timeout');
    if (t !== undefined) req.timeout_secs = t;
    const w = optionalNumber(ttl, 'Wait for offline agents');
    if (w !== undefined) req.ttl_secs = w;
    if (concurrency.value.trim()) req.concurrency = concurrency.value.trim();
    const m = optionalNumber(maxErrors, 'Stop after errors');
    if (m !== undefined) req.max_errors = m;
    return req;
  }

  let asked = 0;
  let matched = 0;
  // A field removed with the page while focused can still report a change (and a debounced
  // check can still be due) after the operator left, perhaps signed in with another token.
  let left = false;
  ctx.on(() => { left = true; });
  async function dryRun() {
    if (left) return;
    const n = ++asked;
    submit.disabled = true;
    submit.textContent = 'Run';
    error.classList.add('hidden');
    let req;
    try { req = request(); } catch (e) {
      signing.classList.add('hidden');
      clear(preview).append(h('p', { class: 'muted' }, e.message));
      return;
    }
    clear(preview).append(h('p', { class: 'muted' }, 'Checking the target…'));
    try {
      const dry = await api('POST', '/jobs', { ...req, dry_run: true });
      if (n !== asked) return;
      matched = dry.matched;
      const offline = dry.matched - dry.online;
      const list = dry.agents.slice(0, 10).map((a) => h('li', {}, a.hostname || a.id, ' ', h('span', { class: 'mono' }, a.id), a.online ? '' : ' (offline)'));
      clear(preview).append(h('div', { class: `notice ${dry.matched ? 'ok' : ''}`, id: 'dry-run' },
        h('strong', {}, `Matches ${plural(dry.matched, 'agent')}`),
        `: ${dry.online} online`,
        offline ? `, ${offline} offline (they run it when they reconnect, if within the wait)` : '',
        '.'),
      h('ul', {}, list, dry.agents.length > 10 ? h('li', {}, `and ${dry.agents.length - 10} more`) : null));
      submit.textContent = `Run on ${plural(dry.matched, 'agent')}`;
      showSigning(req, dry);
      submit.disabled = !submittable();
    } catch (e) {
      if (n !== asked) return;
      signing.classList.add('hidden');
      clear(preview).append(h('div', { class: 'notice error', role: 'alert' }, e.message));
    }
  }

  // Agents with trusted_keys run only what an operator's own key signed. The page cannot sign
  // (the server that serves it is what signing guards against), so it says so, gives the CLI
  // command that signs, and sends unsigned only when the operator ticks that it may fail there.
  function showSigning(req, dry) {
    const needing = dry.agents.filter((a) => (a.trusted_keys || []).length);
    signedOnly = dry.require_signature ?? needing.length;
    const key = needing.map((a) => a.id).join(',');
    if (key !== signedKey) unsignedOk.checked = false;
    signedKey = key;
    signing.classList.toggle('hidden', signedOnly === 0);
    if (signedOnly === 0) { clear(signing); return; }
    const all = signedOnly >= dry.matched;
    const keys = trustedKeys(needing);
    clear(signing).append(
      h('p', {}, h('strong', {}, `${signedOnly} of ${plural(dry.matched, 'target')} accept only signed jobs`),
        ' (keys: ', keys.map((k, i) => [i ? ', ' : '', h('code', { class: 'key' }, k)]), ').'),
      h('p', {}, 'This page cannot sign: a job sent from here ',
        all ? 'would fail on every target' : signedOnly === 1 ? 'would fail on that agent' : `would fail on those ${signedOnly} agents`,
        ' with "not signed by a trusted key". Send it signed from the command line, with one of those keys:'),
      h('pre', { class: 'output', id: 'cli-command' }, cliCommand(req)),
      all ? h('p', { class: 'small' }, 'Run is disabled: every target requires a signature.')
        : h('label', { class: 'confirm' }, unsignedOk,
          ` Send it unsigned anyway: it runs on ${plural(dry.matched - signedOnly, 'agent')} and fails on ${signedOnly}.`));
    if (all) submit.textContent = 'Needs a signature: use the CLI';
  }

  function submittable() {
    if (!canRun() || matched === 0) return false;
    if (signedOnly >= matched) return false;
    return signedOnly === 0 || unsignedOk.checked;
  }
  const check = debounced(dryRun, 300);

  form.addEventListener('input', (e) => { if (e.target !== unsignedOk) check(); });
  form.addEventListener('change', (e) => {
    if (e.target === unsignedOk) { submit.disabled = !submittable(); return; }
    syncTarget();
    check();
  });
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    if (submit.disabled) return;
    submit.disabled = true;
    try {
      const req = request();
      const job = await api('POST', '/jobs', req);
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      error.textContent = err.message;
      error.classList.remove('hidden');
      submit.disabled = !submittable();
    }
  });
  syncTarget();
  await dryRun();
}

// ---------------------------------------------------------------------------------------------
// Start

// ---------------------------------------------------------------------------------------------
// Audit: the audit log, newest first, filtered and paged by the server (admin only).

const AUDIT_PAGE = 100;

async function auditView(ctx) {
  ctx.main.append(h('div', { class: 'page-head' }, h('div', { class: 'titles' }, h('h1', {}, 'Audit'),
    h('div', { class: 'sub' }, 'Who did what, from where, newest first. `muster audit verify` checks the chain.'))));
  if (!isAdmin()) {
    ctx.main.append(h('div', { class: 'notice error', role: 'alert' }, 'The audit log can be read with an admin token only.'));
    return;
  }
  const fields = [['actor', 'Actor or token ID'], ['action', 'Action: token.create, or token'], ['target', 'Target ID'], ['since', 'Since: 1h, 7d or a time']];
  const inputs = {};
  for (const [name, placeholder] of fields) {
    inputs[name] = h('input', { type: 'text', class: 'grow', name, placeholder, 'aria-label': placeholder, value: ctx.query.get(name) || '', spellcheck: false });
  }
  const error = h('div', { class: 'notice error hidden', role: 'alert' });
  const tbody = h('tbody');
  const older = h('button', { type: 'button', id: 'audit-older', class: 'hidden' }, 'Older entries');
  const form = h('form', { class: 'toolbar', id: 'audit-filters' }, ...Object.values(inputs), h('button', { type: 'submit', class: 'primary' }, 'Filter'));
  ctx.main.append(h('div', { class: 'panel' }, form, error,
    h('div', { class: 'table-wrap' }, h('table', { class: 'cards', id: 'audit' },
      h('thead', {}, h('tr', {}, ['ID', 'When', 'Actor', 'Address', 'Action', 'Target', 'Detail'].map((t) => h('th', { scope: 'col' }, t)))),
      tbody)),
    h('div', { class: 'hint' }, older)));

  let before = null;
  function filters() {
    const q = new URLSearchParams();
    for (const [name] of fields) if (inputs[name].value.trim()) q.set(name, inputs[name].value.trim());
    return q;
  }
  async function load(reset) {
    const q = filters();
    q.set('limit', String(AUDIT_PAGE));
    if (!reset && before !== null) q.set('before', String(before));
    let page;
    try {
      page = await api('GET', `/audit?${q}`);
    } catch (e) {
      error.textContent = e.message;
      error.classList.remove('hidden');
      return;
    }
    error.classList.add('hidden');
    if (reset) clear(tbody);
    for (const e of page.entries) {
      tbody.append(h('tr', { 'data-audit-id': String(e.id), 'data-action': e.action },
        h('td', { class: 'num mono' }, String(e.id)),
        h('td', { 'data-label': 'When' }, h('span', { title: e.at }, localTime(e.at))),
        h('td', { class: 'primary', 'data-label': 'Actor' }, e.actor),
        h('td', { class: 'mono', 'data-label': 'Address' }, e.address || '-'),
        h('td', { class: 'mono', 'data-label': 'Action' }, e.action),
        h('td', { class: 'mono', 'data-label': 'Target' }, e.target || '-'),
        h('td', { class: 'mono detail', 'data-label': 'Detail' }, JSON.stringify(e.detail))));
    }
    if (!tbody.children.length) tbody.append(h('tr', {}, h('td', { class: 'empty', colspan: 7 }, 'No entries match.')));
    before = page.next_before;
    older.classList.toggle('hidden', before === null);
  }
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    setQuery(Object.fromEntries(filters()));
    load(true);
  });
  older.addEventListener('click', () => load(false));
  await load(true);
}

window.addEventListener('hashchange', render);
ticker.start();
(async () => {
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (!saved) { renderLogin(); return; }
  try {
    await signIn(saved);
  } catch (e) {
    renderLogin(e.status === 401 ? 'Your session ended: the token was refused. Sign in again.' : e.message);
  }
})();
