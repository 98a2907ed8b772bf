// shop-mesh console: renders every console page from the registry's JSON API and follows its live event stream.
'use strict';
(() => {
  const API = '/api/v1';
  const PAGE_SIZE = 100;
  const CHANGES_LIMIT = 200;
  let csrf = '';
  let leaving = false;

  const $ = (sel, root = document) => root.querySelector(sel);
  const content = () => $('#content');

  // Builds an element; strings always become text (never parsed as HTML).
  function h(tag, props, ...kids) {
    const el = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v == null || v === false) continue;
        if (k === 'class') el.className = v;
        else if (k === 'text') el.textContent = String(v);
        else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
        else el.setAttribute(k, v === true ? '' : String(v));
      }
    }
    append(el, kids);
    return el;
  }
  function append(el, kids) {
    for (const k of kids) {
      if (k == null || k === false) continue;
      if (Array.isArray(k)) append(el, k);
      else el.append(k instanceof Node ? k : String(k));
    }
  }

  const qs = (params) => {
    const u = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v != null && v !== '') u.set(k, String(v));
    return u.toString();
  };
  const query = () => new URLSearchParams(location.search);
  const fmtNum = (n) => (typeof n === 'number' ? String(Math.round(n * 1000) / 1000) : n == null ? '—' : String(n));
  const fmtInt = (n) => (typeof n === 'number' ? n.toLocaleString('en-US') : n == null ? '—' : String(n));
  const plain = (n) => (n == null ? '—' : String(n));
  const yesNo = (b) => (b ? 'yes' : 'no');
  // The registry's messages end without a full stop; one is added before another sentence follows.
  const sentence = (msg) => (/[.!?]$/.test(msg) ? msg : msg + '.');
  const pad = (n) => String(n).padStart(2, '0');
  function fmtTime(ms) {
    if (typeof ms !== 'number') return '—';
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function fmtAge(ms) {
    if (typeof ms !== 'number') return '—';
    const s = Math.max(0, (Date.now() - ms) / 1000);
    if (s < 60) return `${s.toFixed(1)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }
  const address = (i) => (String(i.ip).includes(':') ? `[${i.ip}]` : String(i.ip)) + ':' + i.port;
  const servicePath = (name, ns, group) =>
    `/services/${encodeURIComponent(name)}?${qs({ namespace: ns, group })}`;

  // ---- API ----
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }
  function toLogin() {
    if (leaving) return;
    leaving = true;
    location.replace('/login?next=' + encodeURIComponent(location.pathname + location.search));
  }
  async function api(method, path, body, opts = {}) {
    const init = { method, credentials: 'same-origin', cache: 'no-store', headers: { Accept: 'application/json' } };
    if (method !== 'GET') {
      init.headers['Content-Type'] = 'application/json';
      init.headers['X-CSRF-Token'] = csrf;
      if (body !== undefined) init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(API + path, init);
    } catch (e) {
      throw new ApiError(0, 'UNAVAILABLE', 'The registry cannot be reached (' + e.message + ').');
    }
    let data = null;
    const text = await res.text();
    if (text) {
      try { data = JSON.parse(text); } catch { data = null; }
    }
    if (res.status === 401 && !opts.noRedirect) toLogin();
    if (!res.ok) {
      const msg = data && typeof data.message === 'string' && data.message
        ? data.message
        : `The registry answered ${res.status} ${res.statusText}`.trim() + '.';
      throw new ApiError(res.status, (data && data.code) || 'HTTP_' + res.status, msg);
    }
    return data || {};
  }

  // ---- flash messages ----
  function flash(msg, kind = 'ok', source = '') {
    if (leaving) return;
    const f = $('#flash');
    f.textContent = msg;
    f.className = kind;
    f.dataset.source = source;
    f.hidden = false;
  }
  function clearFlash(source) {
    const f = $('#flash');
    if (!f.hidden && f.dataset.source === source) {
      f.hidden = true;
      f.textContent = '';
      f.className = '';
    }
  }
  const fail = (e, source = '') => flash(e.message || String(e), 'error', source);

  // One fetch in flight at a time; a request made meanwhile runs once more afterwards.
  function refresher(fn) {
    let busy = false;
    let again = false;
    const run = async () => {
      if (busy) { again = true; return; }
      busy = true;
      try {
        do {
          again = false;
          try { await fn(); } catch (e) { if (!leaving) fail(e, 'load'); }
        } while (again && !leaving);
      } finally {
        busy = false;
      }
    };
    return run;
  }

  // ---- live stream ----
  function live(getParams, onChange) {
    const ind = $('#live');
    ind.hidden = false;
    let es = null;
    let timer = 0;
    const show = (cls, text) => { ind.className = cls; ind.textContent = text; };
    const stop = () => { clearTimeout(timer); if (es) { es.close(); es = null; } };
    const open = () => {
      stop();
      show('', 'connecting');
      es = new EventSource(API + '/events?' + qs(getParams()));
      es.onopen = () => { show('on', 'live'); clearFlash('live'); onChange(); };
      es.addEventListener('change', () => onChange());
      es.addEventListener('reset', () => onChange());
      es.addEventListener('ended', (ev) => {
        stop();
        let msg = '';
        try { msg = JSON.parse(ev.data).message || ''; } catch { msg = ev.data || ''; }
        if (/session/i.test(msg)) { toLogin(); return; }
        show('off', 'ended');
        if (msg) flash(msg, 'error', 'live');
        timer = setTimeout(probe, 5000);
      });
      es.onerror = () => {
        if (es && es.readyState === EventSource.CLOSED) {
          stop();
          show('off', 'reconnecting');
          timer = setTimeout(probe, 3000);
        } else {
          show('off', 'reconnecting');
        }
      };
    };
    // The stream was refused or ended: check the session (401 goes to login), then reopen.
    const probe = async () => {
      try {
        await api('GET', '/console/session');
        open();
      } catch (e) {
        if (!leaving) timer = setTimeout(probe, 5000);
      }
    };
    window.addEventListener('pagehide', stop);
    open();
    return { reopen: open };
  }

  // Keeps what the person typed: a focused or edited input is not overwritten by live data.
  function setQuiet(input, value) {
    if (document.activeElement === input || input.dataset.dirty) return;
    input.value = value;
  }
  function track(input) {
    input.addEventListener('input', () => { input.dataset.dirty = '1'; });
    return input;
  }
  // Number typed into an input, or null when it is not one (the server then explains).
  function numberOf(input) {
    const t = input.value.trim();
    if (t === '') return null;
    const n = Number(t);
    return Number.isFinite(n) ? n : null;
  }
  async function act(button, fn) {
    button.disabled = true;
    try { await fn(); } catch (e) { fail(e); } finally { button.disabled = false; }
  }

  // ---- namespace / group selectors ----
  function scope() {
    const q = query();
    return { namespace: q.get('namespace') || 'public', group: q.get('group') || 'DEFAULT_GROUP' };
  }
  function scopeSelectors(state, onChange) {
    const ns = h('select', { id: 'namespace' });
    const gr = h('select', { id: 'group' });
    let list = [];
    const fill = (sel, names, current) => {
      if (!names.includes(current)) names = [current, ...names];
      sel.replaceChildren(...names.map((n) => h('option', { value: n }, n)));
      sel.value = current;
    };
    const groupsOf = (n) => {
      const e = list.find((x) => x.name === n);
      return e && Array.isArray(e.groups) ? e.groups.map((g) => g.name) : [];
    };
    const render = () => {
      fill(ns, list.map((x) => x.name), state.namespace);
      fill(gr, groupsOf(state.namespace), state.group);
    };
    ns.addEventListener('change', () => {
      state.namespace = ns.value;
      const groups = groupsOf(ns.value);
      if (!groups.includes(state.group)) state.group = groups.includes('DEFAULT_GROUP') ? 'DEFAULT_GROUP' : groups[0] || 'DEFAULT_GROUP';
      render();
      onChange();
    });
    gr.addEventListener('change', () => { state.group = gr.value; onChange(); });
    render();
    api('GET', '/namespaces').then((d) => {
      list = Array.isArray(d.namespaces) ? d.namespaces : [];
      render();
    }, (e) => fail(e));
    return [h('label', null, 'Namespace ', ns), h('label', null, 'Group ', gr)];
  }

  function table(id, heads) {
    return h('table', { id, class: 'grid' },
      h('thead', null, h('tr', null, heads.map(([t, cls]) => h('th', { class: cls }, t)))),
      h('tbody'));
  }
  const emptyRow = (cols, text) => h('tr', { class: 'empty' }, h('td', { colspan: cols }, text));

  // ---- /login ----
  function loginPage() {
    document.title = 'Sign in · shop-mesh';
    const user = h('input', { id: 'login-username', name: 'username', autocomplete: 'username', value: 'admin', required: true });
    const pass = h('input', { id: 'login-password', name: 'password', type: 'password', autocomplete: 'current-password' });
    const submit = h('button', { id: 'login-submit', type: 'submit' }, 'Sign in');
    const err = h('p', { id: 'login-error', class: 'error', role: 'alert', hidden: true });
    const form = h('form', { id: 'login-form', class: 'card', novalidate: true },
      h('h1', null, 'Sign in to shop-mesh'),
      h('label', null, 'Username', user),
      h('label', null, 'Password', pass),
      submit, err);
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      err.hidden = true;
      submit.disabled = true;
      try {
        await api('POST', '/console/login', { username: user.value, password: pass.value }, { noRedirect: true });
        const next = query().get('next') || '';
        const safe = next.startsWith('/') && !next.startsWith('//') && !next.startsWith('/\\') && !next.startsWith('/login');
        location.assign(safe ? next : '/services');
      } catch (e) {
        err.textContent = e.message;
        err.hidden = false;
        submit.disabled = false;
        pass.select();
      }
    });
    content().replaceChildren(form);
    (user.value ? pass : user).focus();
  }

  // ---- /services ----
  function servicesPage() {
    document.title = 'Services · shop-mesh';
    const q = query();
    const state = { ...scope(), search: q.get('search') || '', page: Math.max(1, parseInt(q.get('page'), 10) || 1), pages: 1 };
    const key = () => JSON.stringify([state.namespace, state.group, state.search, state.page]);
    const syncUrl = () => {
      const s = qs({ namespace: state.namespace, group: state.group, search: state.search, page: state.page > 1 ? state.page : '' });
      history.replaceState(null, '', location.pathname + '?' + s);
      setNav(state);
    };
    const search = h('input', { id: 'search', type: 'search', placeholder: 'Filter by name', value: state.search, autocomplete: 'off', spellcheck: 'false' });
    const prev = h('button', { id: 'prev', type: 'button' }, '‹ Prev');
    const next = h('button', { id: 'next', type: 'button' }, 'Next ›');
    const info = h('span', { id: 'page-info' });
    const tbl = table('services', [['Service', 'name'], ['Instances', 'num'], ['Healthy', 'num'], ['Protection threshold', 'num']]);
    const tbody = tbl.tBodies[0];

    const refresh = refresher(async () => {
      const k = key();
      const d = await api('GET', '/services?' + qs({ namespace: state.namespace, group: state.group, page: state.page, page_size: PAGE_SIZE, search: state.search }));
      if (k !== key()) { refresh(); return; }
      const total = Number(d.total) || 0;
      state.pages = Math.max(1, Math.ceil(total / PAGE_SIZE));
      if (state.page > state.pages) { state.page = state.pages; syncUrl(); refresh(); return; }
      const list = Array.isArray(d.services) ? d.services : [];
      tbody.replaceChildren(...(list.length ? list.map((s) => {
        const n = Number(s.instance_count) || 0;
        const ok = Number(s.healthy_count) || 0;
        const cls = n > 0 && ok === 0 ? 'down' : ok < n ? 'degraded' : null;
        return h('tr', { 'data-service': s.name, class: cls },
          h('td', { class: 'name' }, h('a', { href: servicePath(s.name, state.namespace, state.group) }, s.name)),
          h('td', { class: 'instances num' }, plain(s.instance_count)),
          h('td', { class: 'healthy num' }, plain(s.healthy_count)),
          h('td', { class: 'threshold num' }, fmtNum(s.protect_threshold)));
      }) : [emptyRow(4, state.search ? `No service matches “${state.search}”.` : 'No services in this group.')]));
      info.textContent = `page ${state.page} of ${state.pages} (${fmtInt(total)} ${total === 1 ? 'service' : 'services'})`;
      prev.disabled = state.page <= 1;
      next.disabled = state.page >= state.pages;
      clearFlash('load');
    });

    const go = (page) => { state.page = page; syncUrl(); refresh(); };
    prev.addEventListener('click', () => { if (state.page > 1) go(state.page - 1); });
    next.addEventListener('click', () => { if (state.page < state.pages) go(state.page + 1); });
    let timer = 0;
    search.addEventListener('input', () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        if (search.value === state.search) return;
        state.search = search.value;
        go(1);
      }, 200);
    });
    let stream = null;
    const selectors = scopeSelectors(state, () => { go(1); stream.reopen(); });

    content().replaceChildren(
      h('div', { class: 'toolbar' }, selectors, h('label', { class: 'grow' }, 'Search ', search),
        h('span', { class: 'pager' }, prev, info, next)),
      tbl);
    syncUrl();
    refresh();
    stream = live(() => ({ namespace: state.namespace, group: state.group }), refresh);
  }

  // ---- /services/{name} ----
  function servicePage(name) {
    document.title = name + ' · shop-mesh';
    const st = scope();
    setNav(st);
    const sq = () => qs({ namespace: st.namespace, group: st.group });
    const base = `/services/${encodeURIComponent(name)}`;
    const revision = h('span', { id: 'service-revision' }, '—');
    const threshold = track(h('input', { id: 'protect-threshold', type: 'number', min: 0, max: 1, step: 0.05 }));
    const setProtect = h('button', { id: 'set-protect', type: 'button' }, 'Set');
    const triggered = h('span', { id: 'protection-triggered', class: 'warn', hidden: true }, 'protection triggered');
    const notFound = h('p', { id: 'not-found', class: 'notice', hidden: true });
    const instTbl = table('instances', [['Address'], ['Cluster'], ['Weight', 'num'], ['Healthy'], ['Enabled'], ['Ephemeral'],
      ['Lease'], ['Last heartbeat'], ['Metadata'], ['Actions']]);
    const itbody = instTbl.tBodies[0];
    const watchTbl = table('watchers', [['Peer'], ['Scope'], ['Since'], ['Queued bytes', 'num'], ['By']]);
    const wtbody = watchTbl.tBodies[0];
    const count = h('span', { class: 'count' });
    const body = h('div', { id: 'service-body' },
      h('div', { class: 'toolbar' },
        h('label', null, 'Protection threshold ', threshold), setProtect, triggered),
      h('h2', null, 'Instances ', count), h('div', { class: 'scroll' }, instTbl),
      h('h2', null, 'Watchers'), h('div', { class: 'scroll' }, watchTbl));

    const renderInstances = (list) => {
      list = list.slice().sort((a, b) => String(a.cluster).localeCompare(String(b.cluster))
        || address(a).localeCompare(address(b), 'en', { numeric: true }));
      const keyOf = (i) => address(i) + '\n' + i.cluster;
      const keys = new Set(list.map(keyOf));
      for (const tr of [...itbody.rows]) {
        if (!tr.dataset.instance || !keys.has(tr.dataset.instance + '\n' + tr.dataset.cluster)) tr.remove();
      }
      const rows = new Map([...itbody.rows].map((tr) => [tr.dataset.instance + '\n' + tr.dataset.cluster, tr]));
      list.forEach((i, idx) => {
        const tr = rows.get(keyOf(i)) || instanceRow(i);
        updateInstance(tr, i);
        if (itbody.rows[idx] !== tr) itbody.insertBefore(tr, itbody.rows[idx] || null);
      });
      if (!list.length) itbody.append(emptyRow(10, 'No instances registered.'));
      count.textContent = `(${list.length})`;
    };
    const instanceRow = (i) => {
      const cell = (cls) => h('td', { class: cls });
      const weight = track(h('input', { class: 'weight', type: 'number', min: 0, step: 'any', 'aria-label': 'weight' }));
      return h('tr', { 'data-instance': address(i), 'data-cluster': i.cluster },
        cell('address'), cell('cluster'), cell('weight num'), cell('healthy'), cell('enabled'), cell('ephemeral'),
        cell('lease'), cell('heartbeat'), cell('metadata'),
        h('td', { class: 'actions' }, weight,
          h('button', { class: 'set-weight', type: 'button', title: 'Set the weight' }, 'Set'),
          h('button', { class: 'toggle', type: 'button' }),
          h('button', { class: 'deregister danger', type: 'button' }, 'Deregister')));
    };
    const updateInstance = (tr, i) => {
      tr.inst = i;
      const c = (cls) => tr.querySelector('td.' + cls);
      tr.dataset.healthy = String(!!i.healthy);
      tr.dataset.enabled = String(!!i.enabled);
      tr.classList.toggle('unhealthy', !i.healthy);
      tr.classList.toggle('offline', !i.enabled);
      c('address').textContent = address(i);
      c('cluster').textContent = i.cluster;
      c('weight').textContent = fmtNum(i.weight);
      c('healthy').textContent = i.healthy ? 'healthy' : 'unhealthy';
      c('enabled').textContent = i.enabled ? 'online' : 'offline';
      c('ephemeral').textContent = yesNo(i.ephemeral);
      c('lease').textContent = i.lease || '—';
      c('lease').dataset.lease = i.lease || '';
      const hb = c('heartbeat');
      if (typeof i.last_heartbeat_ms === 'number') hb.dataset.ms = String(i.last_heartbeat_ms);
      else delete hb.dataset.ms;
      hb.title = fmtTime(i.last_heartbeat_ms);
      hb.textContent = fmtAge(i.last_heartbeat_ms);
      const meta = i.metadata && typeof i.metadata === 'object' ? i.metadata : {};
      const mkey = JSON.stringify(meta);
      if (tr.metaKey !== mkey) {
        tr.metaKey = mkey;
        c('metadata').replaceChildren(...Object.keys(meta).sort().map((k) => {
          const full = `${k}=${meta[k]}`;
          const short = full.length > 32 ? full.slice(0, 31) + '…' : full;
          return h('span', { class: 'chip', title: full !== short ? full : null }, short);
        }));
      }
      setQuiet(tr.querySelector('input.weight'), i.weight ?? '');
      const t = tr.querySelector('button.toggle');
      t.classList.toggle('offline', !!i.enabled);
      t.classList.toggle('online', !i.enabled);
      t.textContent = i.enabled ? 'Set offline' : 'Set online';
      t.title = i.enabled ? 'Take this instance offline' : 'Bring this instance online';
    };
    const renderWatchers = (list) => {
      wtbody.replaceChildren(...(list.length ? list.map((w) => h('tr', { 'data-watcher': w.id },
        h('td', { class: 'peer' }, w.peer ?? '—'),
        h('td', { class: 'scope' }, w.scope ?? '—'),
        h('td', { class: 'since', title: fmtAge(w.since_ms) }, fmtTime(w.since_ms)),
        h('td', { class: 'queued num' }, plain(w.queued_bytes)),
        h('td', { class: 'by' }, w.by ?? '—'))) : [emptyRow(5, 'Nobody watches this service.')]));
    };

    const refresh = refresher(async () => {
      const [s, w] = await Promise.allSettled([api('GET', `${base}?${sq()}`), api('GET', `${base}/watchers?${sq()}`)]);
      if (s.status === 'rejected') {
        const e = s.reason;
        if (e.status !== 404) throw e;
        // Said once, in the page: not also as an error above it.
        notFound.textContent = sentence(e.message) + ' This page shows the service as soon as it is registered.';
        notFound.hidden = false;
        body.hidden = true;
        revision.textContent = '—';
        clearFlash('load');
        return;
      }
      const d = s.value;
      notFound.hidden = true;
      body.hidden = false;
      revision.textContent = plain(d.revision);
      setQuiet(threshold, d.protect_threshold ?? '');
      triggered.hidden = !d.protection_triggered;
      renderInstances(Array.isArray(d.instances) ? d.instances : []);
      if (w.status === 'fulfilled') renderWatchers(Array.isArray(w.value.watchers) ? w.value.watchers : []);
      else throw w.reason;
      clearFlash('load');
    });

    const instPath = (i) => `${base}/instances/${encodeURIComponent(i.ip)}/${encodeURIComponent(i.port)}?` +
      qs({ namespace: st.namespace, group: st.group, cluster: i.cluster });
    itbody.addEventListener('click', (ev) => {
      const b = ev.target.closest('button');
      const tr = b && b.closest('tr');
      if (!tr || !tr.inst) return;
      const i = tr.inst;
      const addr = address(i);
      if (b.classList.contains('set-weight')) {
        const input = tr.querySelector('input.weight');
        const weight = numberOf(input);
        act(b, async () => {
          await api('PATCH', instPath(i), { weight });
          delete input.dataset.dirty;
          flash(`Weight of ${addr} set to ${weight}.`, 'ok');
          refresh();
        });
      } else if (b.classList.contains('toggle')) {
        const enabled = !i.enabled;
        act(b, async () => {
          await api('PATCH', instPath(i), { enabled });
          flash(`${addr} is now ${enabled ? 'online' : 'offline'}.`, 'ok');
          refresh();
        });
      } else if (b.classList.contains('deregister')) {
        if (!confirm(`Deregister ${addr} (cluster ${i.cluster}) from ${name}?`)) return;
        act(b, async () => {
          await api('DELETE', instPath(i));
          flash(`${addr} deregistered from ${name}.`, 'ok');
          refresh();
        });
      }
    });
    itbody.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && ev.target.matches('input.weight')) ev.target.closest('td').querySelector('button.set-weight').click();
    });
    setProtect.addEventListener('click', () => {
      const v = numberOf(threshold);
      act(setProtect, async () => {
        await api('PATCH', `${base}?${sq()}`, { protect_threshold: v });
        delete threshold.dataset.dirty;
        flash(`Protection threshold of ${name} set to ${v}.`, 'ok');
        refresh();
      });
    });
    threshold.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') setProtect.click(); });

    content().replaceChildren(
      h('p', { class: 'crumbs' }, h('a', { href: '/services?' + sq() }, '← Services'), ' · ',
        h('a', { href: '/changes?' + qs({ namespace: st.namespace, group: st.group, service: name }) }, 'Changes of this service')),
      h('div', { class: 'head' }, h('h1', { id: 'service-name' }, name),
        h('dl', { class: 'facts' },
          h('dt', null, 'namespace'), h('dd', { id: 'service-namespace' }, st.namespace),
          h('dt', null, 'group'), h('dd', { id: 'service-group' }, st.group),
          h('dt', null, 'revision'), h('dd', null, revision))),
      notFound, body);
    setInterval(() => {
      for (const td of itbody.querySelectorAll('td.heartbeat')) td.textContent = fmtAge(td.dataset.ms ? Number(td.dataset.ms) : null);
    }, 1000);
    refresh();
    live(() => ({ namespace: st.namespace, group: st.group, service: name }), refresh);
  }

  // ---- /changes ----
  function changesPage() {
    document.title = 'Changes · shop-mesh';
    const state = { ...scope(), service: query().get('service') || '' };
    const syncUrl = () => {
      history.replaceState(null, '', location.pathname + '?' + qs({ namespace: state.namespace, group: state.group, service: state.service }));
      setNav(state);
    };
    const input = h('input', { id: 'change-service', type: 'search', placeholder: 'All services', value: state.service, autocomplete: 'off', spellcheck: 'false' });
    const apply = h('button', { id: 'change-filter', type: 'button' }, 'Filter');
    const note = h('span', { id: 'change-revision', class: 'muted' });
    const tbl = table('changes', [['Revision', 'num'], ['Kind'], ['Service'], ['Instance'], ['Healthy'], ['Enabled'], ['Weight', 'num']]);
    const tbody = tbl.tBodies[0];
    const key = () => JSON.stringify([state.namespace, state.group, state.service]);

    const refresh = refresher(async () => {
      const k = key();
      const d = await api('GET', '/changes?' + qs({ namespace: state.namespace, group: state.group, service: state.service, limit: CHANGES_LIMIT }));
      if (k !== key()) { refresh(); return; }
      const list = (Array.isArray(d.changes) ? d.changes : []).slice().reverse();
      note.textContent = `revision ${plain(d.revision)} · ${list.length} recent ${list.length === 1 ? 'change' : 'changes'}`;
      tbody.replaceChildren(...(list.length ? list.map((c) => {
        const i = c.instance || null;
        const kind = String(c.kind || '');
        return h('tr', { 'data-revision': c.revision, class: 'kind-' + kind.toLowerCase() },
          h('td', { class: 'revision num' }, plain(c.revision)),
          h('td', { class: 'kind' }, kind),
          h('td', { class: 'service' }, h('a', { href: servicePath(c.service, state.namespace, state.group) }, c.service)),
          h('td', { class: 'address', title: i ? 'cluster ' + i.cluster : null }, i ? address(i) : '—'),
          h('td', { class: i && !i.healthy ? 'healthy bad' : 'healthy' }, i ? (i.healthy ? 'healthy' : 'unhealthy') : '—'),
          h('td', { class: i && !i.enabled ? 'enabled off' : 'enabled' }, i ? (i.enabled ? 'online' : 'offline') : '—'),
          h('td', { class: 'weight num' }, i ? fmtNum(i.weight) : '—'));
      }) : [emptyRow(7, 'No recent changes.')]));
      clearFlash('load');
    });

    let stream = null;
    const changed = () => { syncUrl(); refresh(); stream.reopen(); };
    apply.addEventListener('click', () => { state.service = input.value.trim(); changed(); });
    input.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') apply.click(); });
    const selectors = scopeSelectors(state, changed);
    content().replaceChildren(
      h('div', { class: 'toolbar' }, selectors, h('label', null, 'Service ', input), apply, h('span', { class: 'spacer' }), note),
      tbl);
    syncUrl();
    refresh();
    stream = live(() => ({ namespace: state.namespace, group: state.group, service: state.service }), refresh);
  }

  // ---- /cluster ----
  function clusterPage() {
    document.title = 'Cluster · shop-mesh';
    setNav(scope());
    const view = h('div', { id: 'cluster' });
    const refresh = refresher(async () => {
      const d = await api('GET', '/cluster');
      const row = (k, v, id) => [h('dt', null, k), h('dd', { id }, v)];
      const etcd = d.store === 'etcd';
      const parts = [h('dl', { id: 'cluster-info', class: 'facts wide' },
        row('store', d.store ?? '—', 'cluster-store'),
        row('node', d.node ?? '—', 'cluster-node'),
        row('revision', plain(d.revision), 'cluster-revision'),
        row('incarnation', plain(d.incarnation), 'cluster-incarnation'),
        etcd && row('etcd endpoints', (d.etcd_endpoints || []).join(', ') || '—', 'etcd-endpoints'),
        etcd && row('etcd prefix', d.etcd_prefix ?? '—', 'etcd-prefix'))];
      const nodes = Array.isArray(d.nodes) ? d.nodes : [];
      const ntbl = table('registry-nodes', [['Address'], ['Version'], ['Started'], ['Answered this page']]);
      ntbl.tBodies[0].append(...(nodes.length ? nodes.map((n) => h('tr', { 'data-node': n.address, class: n.answering ? 'leader' : null },
        h('td', { class: 'address mono' }, n.address ?? '—'),
        h('td', { class: 'version' }, n.version || '—'),
        h('td', { class: 'started' }, fmtTime(n.started_ms)),
        h('td', { class: 'answering' }, yesNo(n.answering)))) : [emptyRow(4, 'No registry node known.')]));
      parts.push(h('h2', null, 'Registry nodes'), ntbl);
      if (d.nodes_error) parts.push(h('p', { id: 'nodes-error', class: 'notice error' }, d.nodes_error));
      if (!etcd) {
        parts.push(h('p', { id: 'single-process', class: 'notice' },
          'Memory store: this registry is one process. Its registrations live in its memory only and are not shared with any other node.'));
      } else {
        if (d.etcd_error) parts.push(h('p', { id: 'etcd-error', class: 'notice error' }, d.etcd_error));
        const members = Array.isArray(d.etcd_members) ? d.etcd_members : [];
        const tbl = table('etcd-members', [['Name'], ['ID'], ['Client URLs'], ['Leader'], ['Learner']]);
        tbl.tBodies[0].append(...(members.length ? members.map((m) => h('tr', { 'data-member': m.id, class: m.leader ? 'leader' : null },
          h('td', { class: 'name' }, m.name || '—'),
          h('td', { class: 'id mono' }, m.id ?? '—'),
          h('td', { class: 'urls' }, (m.client_urls || []).join(', ') || '—'),
          h('td', { class: 'leader' }, yesNo(m.leader)),
          h('td', { class: 'learner' }, yesNo(m.learner)))) : [emptyRow(5, 'No etcd members known.')]));
        parts.push(h('h2', null, 'etcd members'), tbl);
      }
      view.replaceChildren(...parts);
      clearFlash('load');
    });
    content().replaceChildren(h('h1', null, 'Cluster'), view);
    refresh();
    setInterval(refresh, 5000);
  }

  // ---- /account ----
  function accountPage() {
    document.title = 'Account · shop-mesh';
    setNav(scope());
    const field = (id, label, autocomplete) => {
      const input = h('input', { id, type: 'password', autocomplete });
      return [input, h('label', null, label, input)];
    };
    const [current, currentLabel] = field('password-current', 'Current password', 'current-password');
    const [fresh, freshLabel] = field('password-new', 'New password (at least 12 characters)', 'new-password');
    const [again, againLabel] = field('password-confirm', 'New password, again', 'new-password');
    const submit = h('button', { id: 'password-change', type: 'submit' }, 'Change password');
    const form = h('form', { id: 'password-form', class: 'card', novalidate: true },
      h('h2', null, 'Change the console password'),
      h('p', null, 'Changing it ends every other session, and removes the password the first start handed out.'),
      currentLabel, freshLabel, againLabel, submit);
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      if (fresh.value !== again.value) {
        flash('The two new passwords differ; nothing was changed.', 'error');
        return;
      }
      act(submit, async () => {
        const d = await api('PUT', '/console/password', { current: current.value, new: fresh.value });
        csrf = d.csrf_token || csrf;
        for (const input of [current, fresh, again]) input.value = '';
        flash('The password was changed; every other session was ended.', 'ok');
      });
    });
    content().replaceChildren(h('h1', null, 'Account'), form);
    current.focus();
  }

  // ---- top bar and routing ----
  function setNav(st) {
    const s = st ? '?' + qs({ namespace: st.namespace, group: st.group }) : '';
    for (const a of document.querySelectorAll('#nav a')) {
      if (a.dataset.page !== 'cluster') a.setAttribute('href', '/' + a.dataset.page + s);
    }
  }
  function topbar(session, page) {
    $('#nav').hidden = false;
    for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.page === page);
    const u = $('#user');
    u.textContent = session.username || '';
    u.hidden = false;
    const out = $('#logout');
    out.hidden = false;
    out.addEventListener('click', () => act(out, async () => {
      await api('POST', '/console/logout', {});
      leaving = true;
      location.assign('/login');
    }));
  }

  async function boot() {
    const path = location.pathname.replace(/\/+$/, '') || '/';
    if (path === '/login') return loginPage();
    let session;
    try {
      session = await api('GET', '/console/session');
    } catch (e) {
      if (!leaving) fail(e);
      return;
    }
    csrf = session.csrf_token || '';
    let name = null;
    if (path.startsWith('/services/')) {
      try { name = decodeURIComponent(path.slice('/services/'.length)); } catch { name = path.slice('/services/'.length); }
    }
    const page = path === '/services' || name !== null ? 'services' : path.slice(1);
    topbar(session, page);
    if (path === '/') location.replace('/services');
    else if (path === '/services') servicesPage();
    else if (name !== null) servicePage(name);
    else if (path === '/changes') changesPage();
    else if (path === '/cluster') clusterPage();
    else if (path === '/account') accountPage();
    else content().replaceChildren(h('p', { class: 'notice' }, 'There is no console page at ', h('code', null, location.pathname), '. ', h('a', { href: '/services' }, 'Go to the services.')));
  }

  $('#flash').addEventListener('click', () => { $('#flash').hidden = true; });
  boot();
})();
