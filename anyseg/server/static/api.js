// The HTTP API client: JSON helpers with the optional bearer token.
const API = '/api/v1';

function initialToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get('token');
  if (fromHash) {
    sessionStorage.setItem('anyseg-token', fromHash);
    history.replaceState(null, '', location.pathname + location.search);
  }
  return sessionStorage.getItem('anyseg-token');
}

let token = initialToken();

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === 'string' ? detail : JSON.stringify(detail));
    this.status = status;
  }
}

export async function request(path, options = {}, retry = true) {
  const headers = new Headers(options.headers || {});
  if (token) headers.set('Authorization', `Bearer ${token}`);
  const response = await fetch(path.startsWith('/') ? path : `${API}/${path}`, { ...options, headers });
  if (response.status === 401 && retry) {
    const given = window.prompt('This server needs its access token:');
    if (given) {
      token = given.trim();
      sessionStorage.setItem('anyseg-token', token);
      return request(path, options, false);
    }
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail;
    } catch (err) {
      /* not JSON */
    }
    throw new ApiError(response.status, detail);
  }
  return response;
}

export async function getJson(path) {
  return (await request(path)).json();
}

export async function postJson(path, body, method = 'POST') {
  const response = await request(path, {
    method,
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  return response.status === 204 ? null : response.json();
}

export async function uploadImage(file) {
  const form = new FormData();
  form.append('file', file, file.name || 'image');
  return (await request('images', { method: 'POST', body: form })).json();
}

export async function getBlob(path) {
  return (await request(path)).blob();
}

export async function getArrayBuffer(path) {
  return (await request(path)).arrayBuffer();
}

// Download what `path` returns under `name` (via a temporary object URL).
export async function download(path, name) {
  const blob = await getBlob(path);
  const url = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
