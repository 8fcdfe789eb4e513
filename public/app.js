// Gemini Chat playground: a small client of the public API, in plain JavaScript (no build step).
// Tokens live in sessionStorage (this tab only); an expired access token is refreshed once.

const TOKENS_KEY = 'gemini-chat.tokens';
const MOBILE_KEY = 'gemini-chat.mobile';
const PENDING = new Set(['queued', 'streaming']);

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

const ui = {
  account: $('account'),
  who: $('who'),
  tier: $('tier'),
  usage: $('usage'),
  upgrade: $('upgrade'),
  signout: $('signout'),
  notice: $('notice'),
  error: $('error'),
  signin: $('signin'),
  sendOtpForm: $('send-otp-form'),
  mobile: $('mobile-input'),
  name: $('name-input'),
  verifyForm: $('verify-otp-form'),
  otp: $('otp-input'),
  otpHint: $('otp-hint'),
  workspace: $('workspace'),
  createRoomForm: $('create-room-form'),
  roomName: $('room-name-input'),
  roomList: $('room-list'),
  roomsEmpty: $('rooms-empty'),
  roomTitle: $('room-title'),
  messages: $('messages'),
  composer: $('composer'),
  prompt: $('composer-input'),
  stop: $('stop'),
  send: $('send-message'),
};

const state = {
  /** @type {{ accessToken: string, refreshToken: string } | null} */
  tokens: readTokens(),
  rooms: [],
  roomId: null,
  /** The reply being streamed: { roomId, messageId, controller } */
  streaming: null,
};

// ---------------------------------------------------------------------------------------------
// API access

class ApiError extends Error {
  constructor(status, body) {
    const error = body?.error ?? {};
    super(error.message ?? `Request failed with HTTP ${status}`);
    this.status = status;
    this.code = error.code ?? 'HTTP_' + status;
    this.requestId = error.requestId;
  }
}

function readTokens() {
  try {
    return JSON.parse(sessionStorage.getItem(TOKENS_KEY) ?? 'null');
  } catch {
    return null;
  }
}

function saveTokens(tokens) {
  state.tokens = tokens
    ? { accessToken: tokens.accessToken, refreshToken: tokens.refreshToken }
    : null;
  if (state.tokens) sessionStorage.setItem(TOKENS_KEY, JSON.stringify(state.tokens));
  else sessionStorage.removeItem(TOKENS_KEY);
}

let refreshing = null;

/** Rotates the refresh token once, even when several requests see a 401 at the same time. */
function refreshTokens() {
  refreshing ??= (async () => {
    const refreshToken = state.tokens?.refreshToken;
    if (!refreshToken) return false;
    const res = await fetch('/auth/refresh', {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'application/json' },
      body: JSON.stringify({ refreshToken }),
    });
    if (!res.ok) return false;
    saveTokens(await res.json());
    return true;
  })()
    .catch(() => false)
    .finally(() => {
      refreshing = null;
    });
  return refreshing;
}

/** fetch with the access token; on 401, refreshes once and retries. */
async function authorizedFetch(path, init = {}) {
  const send = () =>
    fetch(path, {
      ...init,
      headers: { ...init.headers, authorization: `Bearer ${state.tokens?.accessToken ?? ''}` },
    });
  let res = await send();
  if (res.status === 401 && (await refreshTokens())) res = await send();
  if (res.status === 401) {
    signedOut('Your session has ended. Please sign in again.');
  }
  return res;
}

/** JSON request; resolves with the body (null for 204), rejects with an ApiError. */
async function api(method, path, body, { auth = true } = {}) {
  const init = {
    method,
    headers: { accept: 'application/json' },
  };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = auth ? await authorizedFetch(path, init) : await fetch(path, init);
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

// ---------------------------------------------------------------------------------------------
// Notices

function notify(message) {
  ui.notice.textContent = message;
}

function showError(error) {
  // A 401 that ended the session is already explained by signedOut().
  if (error instanceof ApiError && error.status === 401 && !state.tokens) return;
  if (!error) {
    ui.error.hidden = true;
    ui.error.textContent = '';
    return;
  }
  const text =
    error instanceof ApiError
      ? `${error.message} (${error.code}${error.requestId ? `, request ${error.requestId}` : ''})`
      : String(error.message ?? error);
  ui.error.textContent = text;
  ui.error.hidden = false;
}

/** Runs a UI action with its button disabled; errors end up in the alert region. */
async function action(button, run) {
  showError(null);
  if (button) button.disabled = true;
  try {
    await run();
  } catch (error) {
    showError(error);
  } finally {
    if (button) button.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Sign-in

function signedOut(message) {
  stopStreamReader();
  saveTokens(null);
  state.rooms = [];
  state.roomId = null;
  ui.workspace.hidden = true;
  ui.account.hidden = true;
  ui.signin.hidden = false;
  ui.verifyForm.hidden = true;
  ui.mobile.value = sessionStorage.getItem(MOBILE_KEY) ?? '';
  if (message) notify(message);
}

ui.sendOtpForm.addEventListener('submit', (event) => {
  event.preventDefault();
  const mobile = ui.mobile.value.trim();
  if (!mobile) {
    showError(new Error('Enter your mobile number.'));
    ui.mobile.focus();
    return;
  }
  action(ui.sendOtpForm.querySelector('button'), async () => {
    const name = ui.name.value.trim();
    try {
      await api('POST', '/auth/signup', { mobile, ...(name ? { name } : {}) }, { auth: false });
    } catch (error) {
      // 409: the number is already registered, which is fine for signing in.
      if (!(error instanceof ApiError && error.status === 409)) throw error;
    }
    sessionStorage.setItem(MOBILE_KEY, mobile);
    let sent;
    try {
      sent = await api('POST', '/auth/send-otp', { mobile }, { auth: false });
    } catch (error) {
      // A code was sent moments ago: it is still valid, so let the user type it.
      if (!(error instanceof ApiError && error.code === 'OTP_COOLDOWN')) throw error;
      sent = null;
      showError(error);
    }
    ui.verifyForm.hidden = false;
    if (sent?.otp) {
      ui.otp.value = sent.otp;
      ui.otpHint.textContent = `Mocked SMS: your code is ${sent.otp} (valid ${Math.round(sent.expiresIn / 60)} minutes).`;
      notify('Code sent and filled in for you.');
      ui.verifyForm.querySelector('button').focus();
    } else {
      ui.otp.value = '';
      ui.otpHint.textContent = sent
        ? 'The code was delivered out of band (OTP_DELIVERY=log: see the server log).'
        : 'Enter the code you received a moment ago.';
      ui.otp.focus();
    }
  });
});

ui.verifyForm.addEventListener('submit', (event) => {
  event.preventDefault();
  action(ui.verifyForm.querySelector('button'), async () => {
    const mobile = ui.mobile.value.trim();
    const otp = ui.otp.value.trim();
    const result = await api('POST', '/auth/verify-otp', { mobile, otp }, { auth: false });
    saveTokens(result);
    ui.otp.value = '';
    ui.otpHint.textContent = '';
    await enterWorkspace();
    notify(`Signed in as ${result.user.mobile}.`);
  });
});

ui.signout.addEventListener('click', () =>
  action(ui.signout, async () => {
    try {
      await api('POST', '/auth/logout', { refreshToken: state.tokens?.refreshToken });
    } finally {
      signedOut('Signed out.');
    }
  }),
);

// ---------------------------------------------------------------------------------------------
// Account: tier, usage, upgrade

async function enterWorkspace() {
  const me = await api('GET', '/user/me');
  ui.who.textContent = me.name ? `${me.name} · ${me.mobile}` : me.mobile;
  ui.signin.hidden = true;
  ui.verifyForm.hidden = true;
  ui.account.hidden = false;
  ui.workspace.hidden = false;
  await Promise.all([refreshStatus(), loadRooms()]);
  if (state.rooms.length > 0) await openRoom(state.rooms[0].id);
  else ui.roomName.focus();
}

async function refreshStatus() {
  const status = await api('GET', '/subscription/status');
  ui.tier.textContent = status.tier === 'pro' ? 'Pro' : 'Basic';
  ui.tier.dataset.tier = status.tier;
  ui.upgrade.hidden = status.tier === 'pro';
  const { used, limit, resetsAt } = status.usage;
  const resets = new Date(resetsAt).toLocaleTimeString([], {
    hour: '2-digit',
    minute: '2-digit',
    timeZoneName: 'short',
  });
  ui.usage.textContent =
    limit === null
      ? `Today: ${used} prompts (unlimited)`
      : `Today: ${used} of ${limit} prompts used · resets ${resets}`;
  ui.usage.dataset.used = String(used);
}

ui.upgrade.addEventListener('click', () =>
  action(ui.upgrade, async () => {
    try {
      const checkout = await api('POST', '/subscribe/pro');
      notify('Opening Stripe Checkout…');
      window.location.assign(checkout.url);
    } catch (error) {
      if (error instanceof ApiError && error.code === 'BILLING_NOT_CONFIGURED') {
        error.message =
          'Upgrading is not available here: billing (Stripe) is not configured on this server.';
      }
      throw error;
    }
  }),
);

// ---------------------------------------------------------------------------------------------
// Chatrooms

async function loadRooms() {
  const { chatrooms } = await api('GET', '/chatroom');
  state.rooms = chatrooms;
  renderRooms();
}

function renderRooms() {
  ui.roomList.replaceChildren(
    ...state.rooms.map((room) => {
      const item = document.createElement('li');
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'room';
      button.textContent = room.name;
      button.dataset.testid = 'room-item';
      button.dataset.roomId = room.id;
      if (room.id === state.roomId) button.setAttribute('aria-current', 'true');
      button.addEventListener('click', () => action(null, () => openRoom(room.id)));
      item.append(button);
      return item;
    }),
  );
  ui.roomsEmpty.hidden = state.rooms.length > 0;
}

ui.createRoomForm.addEventListener('submit', (event) => {
  event.preventDefault();
  const name = ui.roomName.value.trim();
  if (!name) {
    showError(new Error('Give the chatroom a name.'));
    ui.roomName.focus();
    return;
  }
  action(ui.createRoomForm.querySelector('button'), async () => {
    const room = await api('POST', '/chatroom', { name });
    ui.roomName.value = '';
    await loadRooms();
    await openRoom(room.id);
    notify(`Chatroom “${room.name}” created.`);
  });
});

async function openRoom(roomId) {
  stopStreamReader();
  const { chatroom, messages } = await api('GET', `/chatroom/${roomId}?limit=50`);
  state.roomId = chatroom.id;
  renderRooms();
  ui.roomTitle.textContent = chatroom.name;
  ui.composer.hidden = false;
  // The API answers newest first; a conversation reads oldest first.
  const ordered = [...messages].reverse();
  ui.messages.replaceChildren(...ordered.map(renderMessage));
  scrollToEnd();
  const pending = ordered.findLast((m) => m.role === 'assistant' && PENDING.has(m.status));
  if (pending) streamReply(chatroom.id, pending.id);
  ui.prompt.focus();
}

// ---------------------------------------------------------------------------------------------
// Messages

function renderMessage(message) {
  const item = document.createElement('li');
  item.className = `message ${message.role}`;
  item.dataset.testid = 'message';
  item.dataset.messageId = message.id;
  const who = document.createElement('span');
  who.className = 'who';
  who.textContent = message.role === 'user' ? 'You' : 'Assistant';
  const body = document.createElement('p');
  body.className = 'content';
  body.dataset.testid = 'message-content';
  const status = document.createElement('span');
  status.className = 'status';
  status.dataset.testid = 'message-status';
  item.append(who, status, body);
  updateMessage(item, message);
  return item;
}

function updateMessage(item, message) {
  item.dataset.role = message.role;
  item.dataset.status = message.status;
  item.querySelector('.content').textContent = message.content;
  const status = item.querySelector('.status');
  const labels = {
    queued: 'waiting for the model…',
    streaming: 'writing…',
    cancelled: 'stopped',
    failed: `failed${message.error ? `: ${message.error.message}` : ''}`,
    blocked: 'blocked by safety filters',
  };
  status.textContent = labels[message.status] ?? '';
  item.setAttribute('aria-busy', PENDING.has(message.status) ? 'true' : 'false');
}

function messageItem(messageId) {
  return ui.messages.querySelector(`[data-message-id="${CSS.escape(messageId)}"]`);
}

function scrollToEnd() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

ui.prompt.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.composer.addEventListener('submit', (event) => {
  event.preventDefault();
  const content = ui.prompt.value;
  if (!content.trim() || !state.roomId || state.streaming) return;
  const roomId = state.roomId;
  action(ui.send, async () => {
    const accepted = await api('POST', `/chatroom/${roomId}/message`, { content });
    ui.prompt.value = '';
    if (state.roomId !== roomId) return;
    ui.messages.append(
      renderMessage(accepted.userMessage),
      renderMessage(accepted.assistantMessage),
    );
    scrollToEnd();
    refreshStatus().catch(showError);
    streamReply(roomId, accepted.assistantMessage.id);
  }).finally(() => {
    ui.send.disabled = Boolean(state.streaming);
  });
});

ui.stop.addEventListener('click', () => {
  const current = state.streaming;
  if (!current) return;
  action(ui.stop, async () => {
    const message = await api(
      'POST',
      `/chatroom/${current.roomId}/messages/${current.messageId}/cancel`,
    );
    // The stream ends with `done` (status cancelled) within a moment; show the state meanwhile.
    const item = messageItem(message.id);
    if (item && !PENDING.has(message.status)) updateMessage(item, message);
    notify('Stopping the reply…');
  }).finally(() => {
    ui.stop.disabled = !state.streaming;
  });
});

// ---------------------------------------------------------------------------------------------
// Streaming (fetch + a stream reader: EventSource cannot send the Authorization header)

function setStreaming(value) {
  state.streaming = value;
  ui.stop.disabled = !value;
  ui.send.disabled = Boolean(value);
}

function stopStreamReader() {
  state.streaming?.controller.abort();
  setStreaming(null);
}

/** Splits an SSE byte stream into events ({ event, data, id }). */
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const blocks = buffer.split(/\r?\n\r?\n/);
    buffer = blocks.pop() ?? '';
    for (const block of blocks) {
      const event = { event: 'message', data: '', id: undefined };
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line === '' || line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon === -1 ? line : line.slice(0, colon);
        const text = colon === -1 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'event') event.event = text;
        else if (field === 'data') data.push(text);
        else if (field === 'id') event.id = text;
      }
      event.data = data.join('\n');
      if (event.data || event.event !== 'message') yield event;
    }
  }
}

async function streamReply(roomId, messageId) {
  stopStreamReader();
  const controller = new AbortController();
  const current = { roomId, messageId, controller };
  setStreaming(current);
  const item = messageItem(messageId);
  const content = item?.querySelector('.content');
  if (!item || !content) {
    setStreaming(null);
    return;
  }
  let lastEventId = null;
  let finished = false;
  try {
    // A dropped connection resumes right after the last event seen (Last-Event-ID).
    for (let attempt = 0; !finished && attempt < 4; attempt++) {
      if (attempt > 0) await new Promise((resolve) => setTimeout(resolve, 500 * attempt));
      const headers = { accept: 'text/event-stream' };
      if (lastEventId) headers['last-event-id'] = lastEventId;
      const res = await authorizedFetch(`/chatroom/${roomId}/messages/${messageId}/stream`, {
        headers,
        signal: controller.signal,
      });
      if (!res.ok) {
        let body = null;
        try {
          body = await res.json();
        } catch {}
        throw new ApiError(res.status, body);
      }
      try {
        for await (const event of sseEvents(res.body)) {
          if (event.id) lastEventId = event.id;
          const data = event.data ? JSON.parse(event.data) : {};
          if (event.event === 'delta') {
            if (item.dataset.status === 'queued') {
              item.dataset.status = 'streaming';
              item.querySelector('.status').textContent = 'writing…';
            }
            content.textContent += data.text;
            scrollToEnd();
          } else if (event.event === 'reset') {
            content.textContent = '';
          } else if (event.event === 'done') {
            updateMessage(item, data);
            finished = true;
          } else if (event.event === 'error') {
            updateMessage(item, {
              ...data,
              role: 'assistant',
              status: 'failed',
              content: content.textContent,
              error: data,
            });
            finished = true;
          }
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        if (attempt === 3) throw error;
      }
    }
    if (!finished) {
      // The stream kept dropping: show the reply as the API has it now.
      updateMessage(item, await api('GET', `/chatroom/${roomId}/messages/${messageId}`));
    }
    if (item.dataset.status === 'cancelled') notify('Reply stopped.');
    else if (item.dataset.status === 'completed') notify('Reply complete.');
  } catch (error) {
    if (!controller.signal.aborted) showError(error);
  } finally {
    if (state.streaming === current) {
      setStreaming(null);
      if (state.tokens) refreshStatus().catch(() => {});
      ui.prompt.focus();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Start

async function start() {
  const params = new URLSearchParams(window.location.search);
  const checkout = params.get('checkout');
  if (checkout === 'success') {
    notify('Checkout complete. Your tier changes to Pro as soon as Stripe confirms the payment.');
  } else if (checkout === 'cancel') {
    notify('Checkout cancelled. You are still on the Basic tier.');
  }
  if (checkout) window.history.replaceState(null, '', window.location.pathname);

  if (!state.tokens) {
    signedOut();
    ui.mobile.focus();
    return;
  }
  try {
    await enterWorkspace();
  } catch (error) {
    if (state.tokens) showError(error);
    else signedOut();
  }
}

start();
