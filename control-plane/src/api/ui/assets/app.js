// Ferry's dashboard: reads the control plane's JSON API and draws it. Read-only: it only GETs.
'use strict';

const TOKEN_KEY = 'ferry-read-token';
const REFRESH_MS = 2000;
const WAIT = '30s';
// Blocking queries each hold a connection; over HTTP/1.1 a browser has six per host, so only
// this many services are watched, and the rest are read on each refresh.
const MAX_WATCHES = 4;
const KINDS = [['routes', 'route'], ['policies', 'policy'], ['authorizations', 'authorization']];
const SVG = 'http://www.w3.org/2000/svg';

const state = {
  services: [],
  instances: new Map(), // service -> {index, instances}
  watches: new Map(), // service -> AbortController
  resources: { route: new Map(), policy: new Map(), authorization: new Map() },
  history: new Map(), // "kind/service@version" -> entries
  open: new Set(), // keys of open <details>
  sidecars: [],
  traffic: { services: {}, edges: [] },
  needToken: false,
};

class AuthError extends Error {}

const $ = (id) => document.getElementById(id);

// An element with attributes and children; text is always set as text, never parsed.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

// GETs a path of the API with the token; a 401 or 403 forgets the token and asks for another.
async function api(path, signal) {
  const headers = { accept: 'application/json' };
  if (token()) headers.authorization = 'Bearer ' + token();
  const response = await fetch(path, { headers, signal, cache: 'no-store' });
  if (response.status === 401 || response.status === 403) {
    let why = response.status === 401 ? 'The control plane needs a token.' : 'This token may not read the mesh.';
    try {
      const body = await response.json();
      if (body.error) why += ' It said: ' + body.error;
    } catch (_) { /* no JSON body: the status says enough */ }
    askForToken(why);
    throw new AuthError(why);
  }
  if (!response.ok) {
    let why = response.status + ' ' + response.statusText;
    try {
      const body = await response.json();
      if (body.error) why = body.error;
    } catch (_) { /* keep the status */ }
    throw new Error(path + ': ' + why);
  }
  return { body: await response.json(), headers: response.headers };
}

function askForToken(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.needToken = true;
  stopWatches();
  $('login-why').textContent = why;
  $('login').hidden = false;
  $('signout').hidden = true;
  setStatus('needs a token', 'error');
  $('token').focus();
}

function setStatus(text, kind) {
  const el = $('status');
  el.textContent = text;
  el.className = 'status ' + (kind || '');
}

// ---- formatting ----

const HEALTH_NAMES = { HEALTH_PASSING: 'passing', HEALTH_WARNING: 'warning', HEALTH_CRITICAL: 'critical', HEALTH_DRAINING: 'draining', HEALTH_NOT_CHECKED: 'not checked yet' };
const health = (value) => HEALTH_NAMES[value] || (value ? String(value).replace(/^HEALTH_/, '').toLowerCase() : 'unknown');
const num = (v) => (typeof v === 'number' ? v : Number(v || 0));
// Versions and indexes are uint64, strings in proto3 JSON: kept as strings so none rounds.
const ver = (v) => String(v || '0');
// Versions come from a counter that starts at the clock in microseconds: tables show their last
// six digits (as ferryctl does), and the whole value on hover.
const short = (v) => { const s = ver(v); return s.length > 6 ? '…' + s.slice(-6) : s; };
const verCell = (v) => h('td', { class: 'num', title: ver(v) }, 'v' + short(v));
const rps = (v) => { const n = num(v); return n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2); };
const pct = (v) => (num(v) * 100).toFixed(num(v) >= 0.9995 || num(v) === 0 ? 0 : 1) + '%';
const ms = (v) => { const n = num(v); return n >= 1000 ? (n / 1000).toFixed(2) + ' s' : n >= 10 ? n.toFixed(0) + ' ms' : n.toFixed(1) + ' ms'; };
const when = (ts) => (ts ? new Date(ts).toLocaleString() : '');
const rateClass = (v) => (num(v) >= 0.99 ? 'good' : num(v) >= 0.9 ? 'fair' : 'poor');

// A resource from the API, whichever way it is wrapped ({"route": {...}} or the bare object).
function unwrap(resource) {
  if (!resource) return null;
  if (resource.service !== undefined) return resource;
  for (const [, kind] of KINDS) if (resource[kind]) return resource[kind];
  return null;
}

function details(key, summary, fill) {
  const body = h('div');
  const el = h('details', { 'data-key': key, open: state.open.has(key) }, h('summary', null, summary), body);
  el.addEventListener('toggle', () => {
    if (el.open) { state.open.add(key); fill(body); } else state.open.delete(key);
  });
  if (el.open) fill(body);
  return el;
}

// ---- loading ----

function stopWatches() {
  for (const controller of state.watches.values()) controller.abort();
  state.watches.clear();
}

// Watches one service with blocking queries until it leaves the list or the token goes.
async function watch(name, controller) {
  let index = state.instances.get(name)?.index || '0';
  while (!controller.signal.aborted) {
    try {
      const path = '/v1/services/' + encodeURIComponent(name) + (index !== '0' ? '?index=' + index + '&wait=' + WAIT : '');
      const { body, headers } = await api(path, controller.signal);
      index = headers.get('x-ferry-index') || ver(body.index);
      state.instances.set(name, { index, instances: body.instances || [] });
      renderOverview();
      renderServices();
    } catch (error) {
      if (controller.signal.aborted || error instanceof AuthError) return;
      await sleep(REFRESH_MS);
    }
  }
}

function syncWatches() {
  const names = state.services.map((svc) => svc.name);
  const watched = new Set(names.slice(0, MAX_WATCHES));
  for (const [name, controller] of state.watches) {
    if (!watched.has(name)) { controller.abort(); state.watches.delete(name); }
  }
  for (const name of watched) {
    if (!state.watches.has(name)) {
      const controller = new AbortController();
      state.watches.set(name, controller);
      watch(name, controller);
    }
  }
  for (const name of [...state.instances.keys()]) if (!names.includes(name)) state.instances.delete(name);
  return names.filter((name) => !watched.has(name));
}

async function refresh() {
  const services = await api('/v1/services');
  state.services = (services.body.services || []).slice().sort((a, b) => a.name.localeCompare(b.name));
  const unwatched = syncWatches();
  const [sidecars, traffic, ...rest] = await Promise.all([
    api('/v1/sidecars'),
    api('/v1/traffic'),
    ...KINDS.map(([path]) => api('/v1/' + path)),
    ...unwatched.map((name) => api('/v1/services/' + encodeURIComponent(name)).catch((error) => {
      if (error instanceof AuthError) throw error;
      return null; // gone since the list was read
    })),
  ]);
  state.sidecars = (sidecars.body.sidecars || []).slice().sort((a, b) => (a.node_id || '').localeCompare(b.node_id || ''));
  state.traffic = { services: traffic.body.services || {}, edges: traffic.body.edges || [], window: traffic.body.window_seconds };
  KINDS.forEach(([, kind], i) => {
    const map = new Map();
    for (const r of rest[i].body.resources || []) {
      const resource = unwrap(r);
      if (resource) map.set(resource.service, resource);
    }
    state.resources[kind] = map;
  });
  unwatched.forEach((name, i) => {
    const answer = rest[KINDS.length + i];
    if (answer) state.instances.set(name, { index: ver(answer.body.index), instances: answer.body.instances || [] });
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function loop() {
  for (;;) {
    if (!state.needToken) {
      try {
        await refresh();
        render();
        setStatus('live', 'live');
        $('signout').hidden = !token();
      } catch (error) {
        if (!(error instanceof AuthError)) setStatus('offline: ' + error.message, 'error');
      }
    }
    await sleep(REFRESH_MS);
  }
}

// ---- rendering ----

function render() {
  renderOverview();
  renderServices();
  renderTraffic();
}

function allInstances() {
  return [...state.instances.values()].flatMap((entry) => entry.instances);
}

// What a sidecar has not applied: each resource or endpoint set whose current version it has
// not acknowledged, and whether it rejected it.
function rollout() {
  const rows = [];
  for (const sidecar of state.sidecars) {
    const check = (what, progress, nackable) => {
      if (!progress) return;
      const current = ver(progress.current_version);
      const acked = ver(progress.acked_version);
      if (current === acked) return;
      const rejected = nackable && current !== '0' && ver(progress.rejected_version) === current;
      rows.push({
        sidecar, what, current, acked, sent: ver(progress.sent_version),
        state: rejected ? 'NACK' : 'pending',
        why: rejected ? (sidecar.last_nack && sidecar.last_nack.error) || '' : '',
      });
    };
    for (const sub of sidecar.subscriptions || []) {
      check('endpoints of ' + sub.service, sub, false);
      check('route ' + sub.service, sub.route, true);
      check('policy ' + sub.service, sub.policy, true);
    }
    check('authorization ' + (sidecar.service || ''), sidecar.authorization, true);
  }
  return rows;
}

function renderOverview() {
  const instances = allInstances();
  const counts = { passing: 0, warning: 0, critical: 0, draining: 0 };
  for (const i of instances) counts[health(i.health)] = (counts[health(i.health)] || 0) + 1;
  const card = (label, value, cls) => h('div', { class: 'card ' + (cls || '') }, h('div', { class: 'value' }, value), h('div', { class: 'label' }, label));
  const cards = h('div', { class: 'cards' },
    card('services', state.services.length),
    card('instances', instances.length),
    ...Object.entries(counts).map(([name, n]) => card(name, n, n ? name : '')),
    card('sidecars connected', state.sidecars.length));

  const lagging = rollout();
  const rolloutEl = lagging.length === 0
    ? h('p', { class: 'muted' }, 'Every connected sidecar has acknowledged the current version of everything it uses.')
    : h('table', { class: 'rollout' },
      h('thead', null, h('tr', null, ['sidecar', 'resource', 'current', 'sent', 'acked', 'state'].map((c) => h('th', null, c)))),
      h('tbody', null, lagging.map((r) => h('tr', { class: r.state === 'NACK' ? 'nack' : '' },
        h('td', null, r.sidecar.node_id), h('td', null, r.what), verCell(r.current),
        verCell(r.sent), verCell(r.acked),
        h('td', null, r.state, r.why ? h('div', { class: 'why' }, r.why) : null)))));

  const sidecarsEl = state.sidecars.length === 0
    ? h('p', { class: 'muted' }, 'No sidecar is connected.')
    : h('table', null,
      h('thead', null, h('tr', null, ['sidecar', 'service', 'instance', 'build', 'identity', 'connected', 'config'].map((c) => h('th', null, c)))),
      h('tbody', null, state.sidecars.map((sc) => {
        const behind = lagging.filter((r) => r.sidecar === sc);
        const nacks = behind.filter((r) => r.state === 'NACK').length;
        return h('tr', { 'data-sidecar': sc.node_id },
          h('td', null, sc.node_id), h('td', null, sc.service), h('td', null, sc.instance_id || '—'),
          h('td', null, sc.build || ''), h('td', { class: 'small' }, sc.identity || '—'), h('td', null, when(sc.connected_at)),
          h('td', { class: behind.length ? (nacks ? 'poor' : 'fair') : 'good' },
            behind.length ? (nacks ? nacks + ' rejected, ' : '') + behind.length + ' behind' : 'in sync'));
      })));

  $('overview-body').replaceChildren(cards, h('h3', null, 'Config rollout'), rolloutEl, h('h3', null, 'Connected sidecars'), sidecarsEl);
}

function resourceCell(kind, name) {
  const r = state.resources[kind].get(name);
  return r ? verCell(r.version) : h('td', { class: 'num' }, '—');
}

function historyOf(kind, path, resource, body) {
  const key = kind + '/' + resource.service + '@' + ver(resource.version);
  const draw = (entries) => body.replaceChildren(entries.length === 0 ? h('p', { class: 'muted' }, 'No history.')
    : h('table', { class: 'history' }, h('tbody', null, entries.map((e) => h('tr', null,
      verCell(e.version), h('td', null, when(e.at)),
      h('td', null, unwrap(e.resource) ? 'applied' : 'deleted'))))));
  if (state.history.has(key)) return draw(state.history.get(key));
  body.replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
  api('/v1/' + path + '/' + encodeURIComponent(resource.service) + '/history')
    .then(({ body: answer }) => { state.history.set(key, answer.entries || []); draw(answer.entries || []); })
    .catch((error) => body.replaceChildren(h('p', { class: 'error' }, error.message)));
}

function renderServices() {
  const summary = h('table', { class: 'services' },
    h('thead', null, h('tr', null, ['service', 'instances', 'routable', 'virtual IP', 'route', 'policy', 'authorization'].map((c) => h('th', null, c)))),
    h('tbody', null, state.services.map((svc) => {
      // A watched service's instances are fresher than the list's counts (read every 2 s).
      const watched = state.instances.get(svc.name)?.instances;
      const total = watched ? watched.length : num(svc.instances);
      const routable = watched ? watched.filter((i) => ['passing', 'warning'].includes(health(i.health))).length : num(svc.passing);
      return h('tr', { 'data-service': svc.name },
      h('td', null, h('a', { href: '#service-' + svc.name }, svc.name)),
      h('td', { class: 'num' }, total),
      h('td', { class: 'num ' + (routable < total ? 'fair' : '') }, routable),
      h('td', null, svc.virtual_ip || '—'),
      resourceCell('route', svc.name), resourceCell('policy', svc.name), resourceCell('authorization', svc.name));
    })));

  const cards = state.services.map((svc) => {
    const instances = (state.instances.get(svc.name)?.instances || []).slice().sort((a, b) => a.id.localeCompare(b.id));
    const table = h('table', { class: 'instances' },
      h('thead', null, h('tr', null, ['instance', 'address', 'health', 'checks', 'zone', 'version', 'weight'].map((c) => h('th', null, c)))),
      h('tbody', null, instances.map((i) => h('tr', { 'data-instance': i.id },
        h('td', null, i.id), h('td', null, i.address + ':' + i.port),
        h('td', { class: 'health ' + health(i.health) }, health(i.health)),
        h('td', { class: 'small' }, (i.checks || []).map((c) => h('div', null, h('span', { class: health(c.status).replace(/ /g, '-') }, health(c.status)), ' ', c.id || '', c.output ? ': ' + c.output : ''))),
        h('td', null, i.zone || '—'), h('td', null, (i.metadata && i.metadata.version) || '—'),
        h('td', { class: 'num' }, num(i.weight) || 100)))));
    const resources = KINDS.map(([path, kind]) => {
      const r = state.resources[kind].get(svc.name);
      if (!r) return h('div', { class: 'resource muted' }, kind + ': none');
      return details('history/' + kind + '/' + svc.name,
        [h('span', { title: ver(r.version) }, kind + ' v' + short(r.version)), h('span', { class: 'muted' }, ' applied ' + when(r.applied_at))],
        (body) => historyOf(kind, path, r, body));
    });
    return h('div', { class: 'service', id: 'service-' + svc.name }, h('h3', null, svc.name), table, h('div', { class: 'resources' }, resources));
  });
  $('services-body').replaceChildren(summary, ...cards);
}

function renderTraffic() {
  const t = state.traffic;
  const names = [...new Set([...state.services.map((svc) => svc.name), ...Object.keys(t.services), ...t.edges.flatMap((e) => [e.from, e.to])])].sort();
  const figures = (f) => f
    ? [h('td', { class: 'num' }, rps(f.rps)), h('td', { class: 'num ' + rateClass(f.success_rate) }, pct(f.success_rate)), h('td', { class: 'num' }, ms(f.p50_ms)), h('td', { class: 'num' }, ms(f.p99_ms))]
    : [h('td', { class: 'muted', colspan: 4 }, 'no traffic')];
  const perService = h('table', { class: 'traffic' },
    h('thead', null,
      h('tr', null, h('th', null, ''), h('th', { colspan: 4 }, 'in'), h('th', { colspan: 4 }, 'out')),
      h('tr', null, ['service', 'rps', 'success', 'p50', 'p99', 'rps', 'success', 'p50', 'p99'].map((c) => h('th', null, c)))),
    h('tbody', null, names.map((name) => h('tr', { 'data-traffic': name },
      h('td', null, name), figures(t.services[name]?.inbound), figures(t.services[name]?.outbound)))));
  const edges = t.edges.length === 0
    ? h('p', { class: 'muted' }, 'No calls between services in the last ' + (t.window || 60) + ' s.')
    : h('table', { class: 'edges' },
      h('thead', null, h('tr', null, ['from', 'to', 'rps', 'success', 'p50', 'p99'].map((c) => h('th', null, c)))),
      h('tbody', null, t.edges.map((e) => h('tr', { 'data-edge': e.from + '->' + e.to }, h('td', null, e.from), h('td', null, e.to), figures(e)))));
  $('traffic-body').replaceChildren(topology(names, t.edges), h('h3', null, 'Per service'), perService, h('h3', null, 'Calls'), edges);
}

// Who calls whom: services on a circle, an arrow per edge with its figures beside its middle.
function topology(names, edges) {
  const width = 720;
  const height = Math.max(320, Math.min(560, 140 + names.length * 40));
  const cx = width / 2;
  const cy = height / 2;
  const radius = Math.min(cx, cy) - 50;
  const at = new Map(names.map((name, i) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, names.length);
    return [name, names.length === 1 ? [cx, cy] : [cx + radius * Math.cos(angle), cy + radius * Math.sin(angle)]];
  }));
  const svg = s('svg', { class: 'topology', viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': 'who calls whom' },
    s('defs', null, s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
      s('path', { d: 'M 0 0 L 10 5 L 0 10 z', class: 'arrowhead' }))));
  const nodeRadius = 28;
  for (const e of edges) {
    const [x1, y1] = at.get(e.from);
    const [x2, y2] = at.get(e.to);
    const g = s('g', { class: 'edge ' + rateClass(e.success_rate), 'data-edge': e.from + '->' + e.to });
    const dx = x2 - x1;
    const dy = y2 - y1;
    const len = Math.hypot(dx, dy) || 1;
    // The edge's left-hand normal: each direction is offset to its own side, so a pair calling
    // each other shows two arrows, each with its figures on its outer side.
    const nx = -dy / len;
    const ny = dx / len;
    const sx = x1 + (dx / len) * nodeRadius + nx * 6;
    const sy = y1 + (dy / len) * nodeRadius + ny * 6;
    const ex = x2 - (dx / len) * (nodeRadius + 2) + nx * 6;
    const ey = y2 - (dy / len) * (nodeRadius + 2) + ny * 6;
    g.append(s('line', { x1: sx, y1: sy, x2: ex, y2: ey, 'marker-end': 'url(#arrow)' }));
    // Two short lines beside the middle, running away from the arrow: right of it when the
    // normal points right, left of it when it points left, above or below otherwise.
    const lx = (sx + ex) / 2 + nx * 8;
    const ly = (sy + ey) / 2 + ny * 8;
    const anchor = nx > 0.3 ? 'start' : nx < -0.3 ? 'end' : 'middle';
    const first = anchor !== 'middle' ? -2 : ny > 0 ? 12 : -16;
    g.append(s('text', { x: lx, y: ly + first, 'text-anchor': anchor },
      s('tspan', { x: lx }, `${rps(e.rps)} rps`),
      s('tspan', { x: lx, dy: 13 }, `${pct(e.success_rate)} · p99 ${ms(e.p99_ms)}`)));
    svg.append(g);
  }
  for (const name of names) {
    const [x, y] = at.get(name);
    svg.append(s('g', { class: 'node', 'data-node': name },
      s('circle', { cx: x, cy: y, r: nodeRadius }),
      s('text', { x, y: y + 4, 'text-anchor': 'middle' }, name.length > 11 ? name.slice(0, 10) + '…' : name)));
  }
  return svg;
}

// ---- start ----

$('login').addEventListener('submit', (event) => {
  event.preventDefault();
  const value = $('token').value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $('token').value = '';
  $('login').hidden = true;
  state.needToken = false;
  setStatus('connecting', '');
});
$('signout').addEventListener('click', () => askForToken('Token forgotten.'));

loop();
