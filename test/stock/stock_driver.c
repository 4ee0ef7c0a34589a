/*
** stock_driver.c -- runs Lua programs in an *unpatched* Lua 5.4.9, for the
** differential tests (test/support/stock_lua.ex builds and drives it).
**
** It is an Erlang port program ({:packet, 4} on stdin/stdout): each request
** is <4-byte big-endian prologue length><prologue><script>; each program
** runs in a fresh state (luaL_openlibs, then the prologue, then the script as
** chunk "=script" under a message handler, like lua.c's docall).  What the
** script prints is captured (stdout is a memory stream while it runs).
**
** Reply: a sequence of fields <tag byte><4-byte big-endian length><bytes>:
**   'O' output;  'K' the script returned (values follow);  'E' it raised (the
**   error object follows, then 'T' the traceback lua.c would print);
**   'S' the script does not parse (message);  'P' the prologue failed.
**   Values: 'n' nil, 'b' "0"/"1", 'i' integer (decimal), 'f' float ("%.17g"),
**   's' string, 'x' anything else (its type name).
** A count hook stops runaway programs ("stock: instruction limit").
*/

#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"

#define MAX_STEPS_K 200000 /* thousands of instructions per program */

static char *reply;
static size_t reply_len, reply_cap;

static void put (char tag, const char *s, size_t n) {
  if (reply_len + n + 5 > reply_cap) {
    reply_cap = (reply_len + n + 5) * 2;
    reply = realloc(reply, reply_cap);
    if (reply == NULL) abort();
  }
  reply[reply_len++] = tag;
  reply[reply_len++] = (char)(n >> 24);
  reply[reply_len++] = (char)(n >> 16);
  reply[reply_len++] = (char)(n >> 8);
  reply[reply_len++] = (char)n;
  memcpy(reply + reply_len, s, n);
  reply_len += n;
}

static void put_value (lua_State *L, int i) {
  char buf[64];
  switch (lua_type(L, i)) {
    case LUA_TNIL: put('n', "", 0); break;
    case LUA_TBOOLEAN: put('b', lua_toboolean(L, i) ? "1" : "0", 1); break;
    case LUA_TNUMBER:
      if (lua_isinteger(L, i)) {
        snprintf(buf, sizeof buf, "%lld", (long long)lua_tointeger(L, i));
        put('i', buf, strlen(buf));
      }
      else {
        snprintf(buf, sizeof buf, "%.17g", (double)lua_tonumber(L, i));
        put('f', buf, strlen(buf));
      }
      break;
    case LUA_TSTRING: {
      size_t n;
      const char *s = lua_tolstring(L, i, &n);
      put('s', s, n);
      break;
    }
    default: {
      const char *t = luaL_typename(L, i);
      put('x', t, strlen(t));
    }
  }
}

static long steps;

static void hook (lua_State *L, lua_Debug *ar) {
  (void)ar;
  if (++steps > MAX_STEPS_K)
    luaL_error(L, "stock: instruction limit");
}

/* lua.c's message handler, keeping the error object itself for the reply */
static int msghandler (lua_State *L) {
  /* like lua.c's, but without converting a number error object in place */
  const char *msg = lua_isstring(L, 1) ? luaL_tolstring(L, 1, NULL) : NULL;
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      msg = lua_tostring(L, -1);
    else
      msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, "stock_driver.traceback");
  lua_settop(L, 1);
  return 1;
}

static void run_one (const char *pro, size_t plen, const char *src, size_t slen) {
  char *out = NULL;
  size_t out_len = 0;
  FILE *saved = stdout;
  lua_State *L = luaL_newstate();
  int status, base, n, i;
  if (L == NULL) abort();
  /* before the libraries: io.stdout is made from 'stdout' when io opens */
  stdout = open_memstream(&out, &out_len);
  if (stdout == NULL) abort();
  luaL_openlibs(L);
  steps = 0;
  lua_sethook(L, hook, LUA_MASKCOUNT, 1000);
  status = luaL_loadbuffer(L, pro, plen, "=prologue");
  if (status == LUA_OK) status = lua_pcall(L, 0, 0, 0);
  if (status != LUA_OK) {
    size_t n;
    const char *m = lua_tolstring(L, -1, &n);
    fflush(stdout);
    put('P', m ? m : "?", m ? n : 1);
    goto done;
  }
  lua_pushcfunction(L, msghandler);
  base = lua_gettop(L);
  status = luaL_loadbuffer(L, src, slen, "=script");
  if (status != LUA_OK) {
    size_t n;
    const char *m = lua_tolstring(L, -1, &n);
    fflush(stdout);
    put('O', out, out_len);
    put('S', m ? m : "?", m ? n : 1);
    goto done;
  }
  status = lua_pcall(L, 0, LUA_MULTRET, base);
  fflush(stdout);
  put('O', out, out_len);
  if (status == LUA_OK) {
    n = lua_gettop(L) - base;
    put('K', "", 0);
    for (i = 1; i <= n; i++) put_value(L, base + i);
  }
  else {
    size_t tn = 0;
    const char *tb;
    put('E', "", 0);
    put_value(L, -1);
    lua_getfield(L, LUA_REGISTRYINDEX, "stock_driver.traceback");
    tb = lua_tolstring(L, -1, &tn);
    put('T', tb ? tb : "", tb ? tn : 0);
  }
done:
  fclose(stdout);
  stdout = saved;
  free(out);
  lua_close(L);
}

static int read_full (char *p, size_t n) {
  while (n > 0) {
    ssize_t r = read(4, p, n);
    if (r <= 0) return 0;
    p += r;
    n -= (size_t)r;
  }
  return 1;
}

static void write_full (const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(3, p, n);
    if (w <= 0) exit(1);
    p += w;
    n -= (size_t)w;
  }
}

static size_t be32 (const unsigned char *b) {
  return ((size_t)b[0] << 24) | ((size_t)b[1] << 16) | ((size_t)b[2] << 8) | b[3];
}

int main (void) {
  unsigned char hdr[4];
  /* the protocol uses private copies of stdin/stdout (fds 4 and 3); Lua gets
     /dev/null as input and fd 1 (replaced by a memory stream while it runs) */
  if (dup2(1, 3) < 0 || dup2(0, 4) < 0) return 1;
  if (freopen("/dev/null", "r", stdin) == NULL) return 1;
  for (;;) {
    size_t len, plen;
    char *req;
    if (!read_full((char *)hdr, 4)) return 0;
    len = be32(hdr);
    req = malloc(len + 1);
    if (req == NULL || !read_full(req, len) || len < 4) return 1;
    plen = be32((unsigned char *)req);
    if (plen > len - 4) return 1;
    reply_len = 0;
    alarm(20);  /* a C function the hook cannot stop: end the driver */
    run_one(req + 4, plen, req + 4 + plen, len - 4 - plen);
    alarm(0);
    free(req);
    hdr[0] = (unsigned char)(reply_len >> 24);
    hdr[1] = (unsigned char)(reply_len >> 16);
    hdr[2] = (unsigned char)(reply_len >> 8);
    hdr[3] = (unsigned char)reply_len;
    write_full((char *)hdr, 4);
    write_full(reply, reply_len);
  }
}
