/*
** sb_baselib.c -- the sandbox's own versions of Lua 5.4.9 functions that
** must differ from stock in what they may do, written as C functions so
** that a script sees Lua's own names, positions, levels and messages.
** Copyright (C) 1994-2025 Lua.org, PUC-Rio (the parts copied from
** lbaselib.c, liolib.c, ldblib.c, lauxlib.c and loadlib.c; see LICENSE-lua).
**
**  print, io.write, io.stdout:write  -- output goes to the run's buffer
**      (lua_sandbox_emit) instead of stdout; formatting as liolib/lbaselib.
**  pcall, xpcall  -- lbaselib's, plus the sticky-abort check after the call.
**  load  -- lbaselib's; text chunks only, at most max_source bytes (also
**      through a reader function), each byte charged to the budget.
**  collectgarbage  -- every option; never stops the collector or changes
**      its mode or parameters (it answers as if it had); a collection or a
**      step is charged to the budget.
**  require  -- package.loaded (the built-in libraries), then the host's
**      modules; an unknown module's error lists the available ones.
**  debug.traceback  -- ldblib's, formatting only the script's frames.
**  removed functions (io.read, os.getenv, dofile, debug.getinfo, ...) are
**      stubs that raise "io.read is not available in this sandbox";
**      indexing 'package' for a removed field does the same.
**  the runner of the run coroutine and the tool-call functions.
*/

#define LUA_LIB

#include "lprefix.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

/* LUA_SANDBOX: the largest traceback level looked at (deeper than any stack) */
#define SB_MAXLEVEL	(INT_MAX / 2)

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"

#include "sb_budget.h"
#include "lstate.h"  /* sb_gcpause: the collector's debt */
#include "lgc.h"
#include "sb_sandbox.h"


static void emit (lua_State *L, const char *s, size_t n) {
  if (lua_sandbox_emit(L, s, n) != 0)
    sb_raise_abort(L);
}


/*
** Output is emitted in as few pieces as stock Lua's output can be told
** apart from: a whole line for print and a whole call for io.write, except
** that what was written before an argument whose conversion runs code
** ('__tostring') or raises is emitted first, so an error leaves exactly the
** output stock Lua would have written.
*/
static void flush (lua_State *L, luaL_Buffer *b) {
  size_t n;
  const char *s;
  luaL_pushresult(b);
  s = lua_tolstring(L, -1, &n);
  if (n > 0) emit(L, s, n);
  lua_pop(L, 1);
  luaL_buffinit(L, b);
}


/* lbaselib.c's luaB_print */
static int sb_print (lua_State *L) {
  int n = lua_gettop(L);  /* number of arguments */
  int i;
  luaL_Buffer b;
  sb_after(L, LUA_OK);
  luaL_buffinit(L, &b);
  for (i = 1; i <= n; i++) {  /* for each argument */
    if (i > 1)  /* not the first element? */
      luaL_addchar(&b, '\t');  /* add a tab before it */
    if (luaL_getmetafield(L, i, "__tostring") != LUA_TNIL) {
      lua_pop(L, 1);
      flush(L, &b);  /* the conversion runs code */
    }
    luaL_tolstring(L, i, NULL);  /* convert it to string */
    luaL_addvalue(&b);  /* print it */
  }
  luaL_addchar(&b, '\n');
  flush(L, &b);
  return 0;
}


/*
** {======================================================
** io: write to the run's output, and the stdout handle
** =======================================================
*/

#define SB_FILE		"FILE*"	/* the metatable name liolib uses */

/* liolib.c's g_write; the file handle is on the stack top */
static int g_write (lua_State *L, int arg) {
  int nargs = lua_gettop(L) - arg;
  int file = lua_gettop(L);
  luaL_Buffer b;
  sb_after(L, LUA_OK);
  luaL_buffinit(L, &b);
  for (; nargs--; arg++) {
    if (lua_type(L, arg) == LUA_TNUMBER) {
      char buf[64];  /* LUA_NUMBER_FMT is "%.14g" */
      int len = lua_isinteger(L, arg)
                ? l_sprintf(buf, sizeof(buf), LUA_INTEGER_FMT,
                             (LUAI_UACINT)lua_tointeger(L, arg))
                : l_sprintf(buf, sizeof(buf), LUA_NUMBER_FMT,
                             (LUAI_UACNUMBER)lua_tonumber(L, arg));
      luaL_addlstring(&b, buf, (size_t)len);
    }
    else {
      size_t l;
      const char *s;
      if (lua_type(L, arg) != LUA_TSTRING)
        flush(L, &b);  /* the check below raises */
      s = luaL_checklstring(L, arg, &l);
      luaL_addlstring(&b, s, l);
    }
  }
  {  /* the last piece is emitted even when empty: every call counts toward max_output */
    size_t n;
    const char *s;
    luaL_pushresult(&b);
    s = lua_tolstring(L, -1, &n);
    emit(L, s, n);
    lua_pop(L, 1);
  }
  lua_pushvalue(L, file);
  return 1;  /* the file handle */
}


static int io_write (lua_State *L) {
  lua_getfield(L, lua_upvalueindex(1), "stdout");
  return g_write(L, 1);
}


static int f_write (lua_State *L) {
  luaL_checkudata(L, 1, SB_FILE);
  lua_pushvalue(L, 1);  /* push file at the stack top (to be returned) */
  return g_write(L, 2);
}


/* nothing is buffered: flushing succeeds (liolib returns true) */
static int io_flush (lua_State *L) {
  lua_pushboolean(L, 1);
  return 1;
}


static int f_flush (lua_State *L) {
  luaL_checkudata(L, 1, SB_FILE);
  lua_pushboolean(L, 1);
  return 1;
}


static int f_tostring (lua_State *L) {
  lua_pushfstring(L, "file (%p)", lua_touserdata(L, 1));
  return 1;
}

/* }====================================================== */


/*
** {======================================================
** pcall, xpcall (lbaselib.c), checking for an abort afterwards
** =======================================================
*/

static int finishpcall (lua_State *L, int status, lua_KContext extra) {
  sb_after(L, status);  /* LUA_SANDBOX: an abort is never caught */
  if (l_unlikely(status != LUA_OK && status != LUA_YIELD)) {  /* error? */
    lua_pushboolean(L, 0);  /* first result (false) */
    lua_pushvalue(L, -2);  /* error message */
    return 2;  /* return false, msg */
  }
  else
    return lua_gettop(L) - (int)extra;  /* return all results */
}


static int sb_pcall (lua_State *L) {
  int status;
  luaL_checkany(L, 1);
  lua_pushboolean(L, 1);  /* first result if no errors */
  lua_insert(L, 1);  /* put it in place */
  status = lua_pcallk(L, lua_gettop(L) - 2, LUA_MULTRET, 0, 0, finishpcall);
  return finishpcall(L, status, 0);
}


static int sb_xpcall (lua_State *L) {
  int status;
  int n = lua_gettop(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);  /* check error function */
  lua_pushboolean(L, 1);  /* first result */
  lua_pushvalue(L, 1);  /* function */
  lua_rotate(L, 3, 2);  /* move them below function's arguments */
  status = lua_pcallk(L, n - 2, LUA_MULTRET, 2, 2, finishpcall);
  return finishpcall(L, status, 2);
}

/* }====================================================== */


/*
** {======================================================
** load (lbaselib.c): text only, bounded, charged
** =======================================================
*/

#define RESERVEDSLOT	5

typedef struct LoadState {
  const char *s;  /* the string chunk */
  size_t size;
  size_t total;  /* bytes handed to the parser so far */
  size_t max;  /* max_source */
  int first;  /* no byte read yet */
  int isstring;  /* loading a string (else from the function at 1) */
} LoadState;


static const char *sb_reader (lua_State *L, void *ud, size_t *size) {
  LoadState *ls = (LoadState *)ud;
  const char *p;
  if (ls->isstring) {  /* a string chunk: one piece */
    p = ls->s;
    *size = ls->size;
    ls->size = 0;
    if (*size == 0) return NULL;
  }
  else {  /* lbaselib's generic_reader */
    luaL_checkstack(L, 2, "too many nested functions");
    lua_pushvalue(L, 1);  /* get function */
    lua_call(L, 0, 1);  /* call it */
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);  /* pop result */
      *size = 0;
      return NULL;
    }
    else if (l_unlikely(!lua_isstring(L, -1)))
      luaL_error(L, "reader function must return a string");
    lua_replace(L, RESERVEDSLOT);  /* save string in reserved slot */
    p = lua_tolstring(L, RESERVEDSLOT, size);
  }
  if (ls->first > 0 && *size > 0) {
    ls->first = 0;
    if (p[0] == LUA_SIGNATURE[0]) {  /* bytecode is never loaded */
      lua_pushliteral(L, "attempt to load a binary chunk (mode is 't')");
      lua_error(L);
    }
  }
  ls->total += *size;
  if (ls->total > ls->max) {
    lua_pushliteral(L, "chunk is larger than max_source");
    lua_error(L);
  }
  {  /* parsing is charged one step per byte (the ticker does not see it) */
    unsigned long long steps = (unsigned long long)*size;
    sb_flush(L, &steps);
  }
  return p;
}


static int load_aux (lua_State *L, int status, int envidx) {
  if (l_likely(status == LUA_OK)) {
    if (envidx != 0) {  /* 'env' parameter? */
      lua_pushvalue(L, envidx);  /* environment for loaded function */
      if (!lua_setupvalue(L, -2, 1))  /* set it as 1st upvalue */
        lua_pop(L, 1);  /* remove 'env' if not used by previous call */
    }
    return 1;
  }
  else {  /* error (message is on top of the stack) */
    luaL_pushfail(L);
    lua_insert(L, -2);  /* put before error message */
    return 2;  /* return fail plus error message */
  }
}


static size_t max_source (lua_State *L) {
  lua_Integer n;
  lua_getfield(L, LUA_REGISTRYINDEX, SB_MAXSOURCE);
  n = lua_tointeger(L, -1);
  lua_pop(L, 1);
  return (n > 0) ? (size_t)n : 0;
}


static int sb_load (lua_State *L) {
  int status;
  size_t l;
  const char *s = lua_tolstring(L, 1, &l);
  const char *mode = luaL_optstring(L, 3, "bt");
  int env = (!lua_isnone(L, 4) ? 4 : 0);  /* 'env' index or 0 if no 'env' */
  LoadState ls;
  ls.total = 0;
  ls.max = max_source(L);
  ls.first = 1;
  if (s != NULL) {  /* loading a string? */
    const char *chunkname = luaL_optstring(L, 2, s);
    if (l > ls.max) {
      luaL_pushfail(L);
      lua_pushliteral(L, "chunk is larger than max_source");
      return 2;
    }
    ls.s = s;
    ls.size = l;
    ls.isstring = 1;
    status = lua_load(L, sb_reader, &ls, chunkname, mode);
  }
  else {  /* loading from a reader function */
    const char *chunkname = luaL_optstring(L, 2, "=(load)");
    luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_settop(L, RESERVEDSLOT);  /* create reserved slot */
    ls.s = NULL;
    ls.size = 0;
    ls.isstring = 0;
    status = lua_load(L, sb_reader, &ls, chunkname, mode);
  }
  sb_after(L, status);  /* errors of a reader cannot hide an abort */
  return load_aux(L, status, env);
}

/* }====================================================== */


/*
** The collector paused while the host builds values (marshaling, with the
** memory limit lifted: no step may run a finalizer then). Stock
** LUA_GCSTOP/LUA_GCRESTART would set the debt to zero, so the first allocation
** after every build would start a collection step: on a session, a step of
** marking per call. These keep the pacing instead: the bytes allocated while
** paused count as debt, as if the collector had only deferred its steps.
*/
void sb_gcpause (lua_State *L, long long saved[3]) {
  global_State *g = G(L);
  saved[0] = (long long)gettotalbytes(g);
  saved[1] = (long long)g->GCdebt;
  saved[2] = g->gcstp;
  g->gcstp |= GCSTPUSR;
}

void sb_gcresume (lua_State *L, const long long saved[3]) {
  global_State *g = G(L);
  l_mem grown = gettotalbytes(g) - (l_mem)saved[0];
  g->gcstp = (lu_byte)saved[2];
  luaE_setdebt(g, (l_mem)saved[1] + grown);
}


/*
** collectgarbage (lbaselib.c): answers every option as stock does, but the
** collector keeps running in incremental mode with its parameters.
*/
static int pushmode (lua_State *L, int oldmode) {
  if (oldmode == -1)
    luaL_pushfail(L);  /* invalid call to 'lua_gc' */
  else
    lua_pushstring(L, (oldmode == LUA_GCINC) ? "incremental"
                                             : "generational");
  return 1;
}


#define checkvalres(res) { if (res == -1) break; }

/* work of a collection, charged before it runs: one step per 16 bytes */
static void charge_collection (lua_State *L) {
  size_t bytes = (size_t)lua_gc(L, LUA_GCCOUNT) * 1024u
               + (size_t)lua_gc(L, LUA_GCCOUNTB);
  unsigned long long steps = sb_bytes(bytes);
  sb_flush(L, &steps);
}


static int sb_collectgarbage (lua_State *L) {
  static const char *const opts[] = {"stop", "restart", "collect",
    "count", "step", "setpause", "setstepmul",
    "isrunning", "generational", "incremental", NULL};
  static const int optsnum[] = {LUA_GCSTOP, LUA_GCRESTART, LUA_GCCOLLECT,
    LUA_GCCOUNT, LUA_GCSTEP, LUA_GCSETPAUSE, LUA_GCSETSTEPMUL,
    LUA_GCISRUNNING, LUA_GCGEN, LUA_GCINC};
  int o = optsnum[luaL_checkoption(L, 1, "collect", opts)];
  switch (o) {
    case LUA_GCCOUNT: {
      int k = lua_gc(L, o);
      int b = lua_gc(L, LUA_GCCOUNTB);
      checkvalres(k);
      lua_pushnumber(L, (lua_Number)k + ((lua_Number)b/1024));
      return 1;
    }
    case LUA_GCSTEP: {
      int step = (int)luaL_optinteger(L, 2, 0);
      int res;
      charge_collection(L);
      res = lua_gc(L, o, step);
      checkvalres(res);
      lua_pushboolean(L, res);
      return 1;
    }
    case LUA_GCSETPAUSE:
    case LUA_GCSETSTEPMUL: {  /* reports the value, keeps it */
      int p = (int)luaL_optinteger(L, 2, 0);
      int previous = lua_gc(L, o, p);
      checkvalres(previous);
      lua_gc(L, o, previous);
      lua_pushinteger(L, previous);
      return 1;
    }
    case LUA_GCISRUNNING: {
      int res = lua_gc(L, o);
      checkvalres(res);
      lua_pushboolean(L, res);
      return 1;
    }
    case LUA_GCGEN:
    case LUA_GCINC: {  /* the mode never changes: it was and stays incremental */
      (void)luaL_optinteger(L, 2, 0);
      (void)luaL_optinteger(L, 3, 0);
      if (o == LUA_GCINC) (void)luaL_optinteger(L, 4, 0);
      return pushmode(L, LUA_GCINC);
    }
    case LUA_GCSTOP:
    case LUA_GCRESTART:
      lua_pushinteger(L, 0);  /* what stock returns; nothing changes */
      return 1;
    default: {  /* LUA_GCCOLLECT */
      int res;
      charge_collection(L);
      res = lua_gc(L, o);
      checkvalres(res);
      lua_pushinteger(L, res);
      return 1;
    }
  }
  luaL_pushfail(L);  /* invalid call (inside a finalizer) */
  return 1;
}


/*
** {======================================================
** require
** =======================================================
*/

#define MAXLISTED	64

/* "a, b, c": the names in package.loaded and the host's modules, sorted */
static void pushavailable (lua_State *L) {
  const char *names[MAXLISTED];
  int n = 0, i, j, t;
  luaL_Buffer b;
  int tables[2];
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  tables[0] = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, SB_MODULES);
  tables[1] = lua_gettop(L);
  for (t = 0; t < 2; t++) {
    if (!lua_istable(L, tables[t])) continue;
    lua_pushnil(L);
    while (lua_next(L, tables[t]) != 0) {
      lua_pop(L, 1);
      if (lua_type(L, -1) == LUA_TSTRING && n < MAXLISTED) {
        const char *k = lua_tostring(L, -1);
        int dup = 0;
        for (i = 0; i < n; i++) dup |= (strcmp(names[i], k) == 0);
        /* the key stays alive in its table, which is on the stack */
        if (!dup) names[n++] = k;
      }
    }
  }
  for (i = 1; i < n; i++)  /* insertion sort */
    for (j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
      const char *tmp = names[j]; names[j] = names[j - 1]; names[j - 1] = tmp;
    }
  luaL_buffinit(L, &b);
  for (i = 0; i < n; i++) {
    if (i > 0) luaL_addstring(&b, ", ");
    luaL_addstring(&b, names[i]);
  }
  luaL_pushresult(&b);
  lua_replace(L, tables[0]);
  lua_settop(L, tables[0]);
}


/*
** The module name as a table key (at the top), as 'lua_getfield(L, t, name)'
** saw it: the name up to its first NUL. 'lua_getfield' found that NUL with
** 'strlen', compared the name whole with 'luaS_new''s cache and made a new
** long string, hashed again, per lookup: 16 MiB each with no check. Here
** the NUL is looked for in pieces of LUA_SBPIECE bytes, charged one unit per
** 16 and checked between two, and a name without one (any real name) is its
** own key: one string for every lookup, hashed once (in pieces, by the VM).
*/
static void pushnamekey (lua_State *L, int idx) {
  size_t len, done = 0;
  const char *name = lua_tolstring(L, idx, &len);
  const char *nul = NULL;
  while (done < len && nul == NULL) {
    size_t n = (len - done < LUA_SBPIECE) ? len - done : LUA_SBPIECE;
    nul = (const char *)memchr(name + done, '\0', n);
    done += n;
    lua_sandboxcharge(L, (lua_Integer)(n / SB_BYTES_PER_STEP));
    if (done < len && nul == NULL)
      lua_sandboxcheck(L);
  }
  if (nul == NULL)
    lua_pushvalue(L, idx);
  else
    lua_pushlstring(L, name, (size_t)(nul - name));
}


static int require_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status; (void)ctx;
  /* stack: name, key, LOADED, loader result */
  if (!lua_isnil(L, -1)) {  /* non-nil return? */
    lua_pushvalue(L, 2);
    lua_insert(L, -2);
    lua_settable(L, 3);  /* LOADED[name] = returned value */
  }
  else
    lua_pop(L, 1);  /* pop nil */
  lua_pushvalue(L, 2);
  if (lua_gettable(L, 3) == LUA_TNIL) {   /* module set no value? */
    lua_pushboolean(L, 1);  /* use true as result */
    lua_copy(L, -1, -2);  /* replace loader result */
    lua_pushvalue(L, 2);
    lua_insert(L, -2);
    lua_settable(L, 3);  /* LOADED[name] = true */
  }
  lua_pushliteral(L, ":preload:");  /* loader data, as for package.preload */
  return 2;
}


/* loadlib.c's ll_require over package.loaded and the host's modules */
static int sb_require (lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  lua_settop(L, 1);
  pushnamekey(L, 1);  /* key at index 2 */
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);  /* LOADED at 3 */
  lua_pushvalue(L, 2);
  lua_gettable(L, 3);  /* LOADED[name] */
  if (lua_toboolean(L, -1))  /* is it there? */
    return 1;  /* package is already loaded */
  lua_pop(L, 1);
  lua_getfield(L, LUA_REGISTRYINDEX, SB_MODULES);
  lua_pushvalue(L, 2);
  if (!lua_istable(L, 4) || lua_gettable(L, 4) != LUA_TFUNCTION) {
    pushavailable(L);
    return luaL_error(L, "module '%s' not found (available: %s)", name,
                      lua_tostring(L, -1));
  }
  lua_remove(L, 4);  /* name, key, LOADED, loader */
  lua_pushvalue(L, 1);  /* name is 1st argument to module loader */
  lua_pushliteral(L, ":preload:");  /* 2nd argument */
  /* a module may call tools while it loads: allow yields */
  lua_callk(L, 2, 1, 0, require_k);
  return require_k(L, LUA_OK, 0);
}


/* require's host modules for this run (a table name -> loader) */
static int sb_setmodules (lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, SB_MODULES);
  return 0;
}

/* }====================================================== */


/*
** {======================================================
** Tracebacks of the script's frames (lauxlib.c's luaL_traceback)
** =======================================================
*/

#define LEVELS1	10	/* size of the first part of the stack */
#define LEVELS2	11	/* size of the second part of the stack */


static int findfield (lua_State *L, int objidx, int level) {
  if (level == 0 || !lua_istable(L, -1))
    return 0;  /* not found */
  lua_pushnil(L);  /* start 'next' loop */
  while (lua_next(L, -2)) {  /* for each pair in table */
    if (lua_type(L, -2) == LUA_TSTRING) {  /* ignore non-string keys */
      if (lua_rawequal(L, objidx, -1)) {  /* found object? */
        lua_pop(L, 1);  /* remove value (but keep name) */
        return 1;
      }
      else if (findfield(L, objidx, level - 1)) {  /* try recursively */
        /* stack: lib_name, lib_table, field_name (top) */
        lua_pushliteral(L, ".");  /* place '.' between the two names */
        lua_replace(L, -3);  /* (in the slot occupied by lib_table) */
        lua_concat(L, 3);  /* lib_name.field_name */
        return 1;
      }
    }
    lua_pop(L, 1);  /* remove value */
  }
  return 0;  /* not found */
}


static int pushglobalfuncname (lua_State *L, lua_Debug *ar) {
  int top = lua_gettop(L);
  lua_getinfo(L, "f", ar);  /* push function */
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  luaL_checkstack(L, 6, "not enough stack");  /* slots for 'findfield' */
  if (findfield(L, top + 1, 2)) {
    const char *name = lua_tostring(L, -1);
    if (strncmp(name, LUA_GNAME".", 3) == 0) {  /* name start with '_G.'? */
      lua_pushstring(L, name + 3);  /* push name without prefix */
      lua_remove(L, -2);  /* remove original name */
    }
    lua_copy(L, -1, top + 1);  /* copy name to proper place */
    lua_settop(L, top + 1);  /* remove table "loaded" and name copy */
    return 1;
  }
  else {
    lua_settop(L, top);  /* remove function and global table */
    return 0;
  }
}


static void pushfuncname (lua_State *L, lua_Debug *ar) {
  if (pushglobalfuncname(L, ar)) {  /* try first a global name */
    lua_pushfstring(L, "function '%s'", lua_tostring(L, -1));
    lua_remove(L, -2);  /* remove name */
  }
  else if (*ar->namewhat != '\0')  /* is there a name from code? */
    lua_pushfstring(L, "%s '%s'", ar->namewhat, ar->name);  /* use it */
  else if (*ar->what == 'm')  /* main? */
      lua_pushliteral(L, "main chunk");
  else if (*ar->what != 'C')  /* for Lua functions, use <file:line> */
    lua_pushfstring(L, "function <%s:%d>", ar->short_src, ar->linedefined);
  else  /* nothing left... */
    lua_pushliteral(L, "?");
}


/*
** The last level of L1's stack (0 if it has none). Stock searches it with
** 'lua_getstack' (a walk from the top each time) doubling then bisecting:
** ~36 walks over a recursion ~170 000 deep, 7-10 ms for one error's
** traceback. One walk here, a unit per 8 levels (as 'lua_getstack')
** charged to the running thread L, which raises when the run is aborted (a
** C function's context).
*/
static int lastlevel (lua_State *L, lua_State *L1) {
  lua_Debug ar;
  int last = 0;
  if (!lua_getstack(L1, 0, &ar))
    return 0;
  while (lua_sandboxnextlevel(L1, &ar)) {
    if ((++last & 7) == 0)
      lua_sandboxcharge(L, 1);
  }
  return last;
}


/*
** luaL_traceback without the frames below the script: the run coroutine's
** base is the runner (a C function of the sandbox).
*/
static void sb_traceback (lua_State *L, lua_State *L1,
                          const char *msg, int level) {
  luaL_Buffer b;
  lua_Debug ar;
  int last = lastlevel(L, L1);
  int limit2show;
  int found;
  if (sb_is_main(L, L1))
    last--;  /* the runner */
  limit2show = (last - level > LEVELS1 + LEVELS2) ? LEVELS1 : -1;
  luaL_buffinit(L, &b);
  if (msg) {
    luaL_addstring(&b, msg);
    luaL_addchar(&b, '\n');
  }
  luaL_addstring(&b, "stack traceback:");
  /* LUA_SANDBOX: each level after the first is the one below the last
     ('lua_sandboxnextlevel'), not a walk from the top ('lua_getstack') */
  found = (level <= last) && lua_getstack(L1, level, &ar);
  while (found) {
    level++;
    if (limit2show-- == 0) {  /* too many levels? */
      int n = last - level - LEVELS2 + 1;  /* number of levels to skip */
      lua_pushfstring(L, "\n\t...\t(skipping %d levels)", n);
      luaL_addvalue(&b);  /* add warning about skip */
      level += n;  /* and skip to last levels */
      found = (level <= last) && lua_getstack(L1, level, &ar);
      continue;
    }
    else {
      lua_getinfo(L1, "Slnt", &ar);
      if (ar.currentline <= 0)
        lua_pushfstring(L, "\n\t%s: in ", ar.short_src);
      else
        lua_pushfstring(L, "\n\t%s:%d: in ", ar.short_src, ar.currentline);
      luaL_addvalue(&b);
      pushfuncname(L, &ar);
      luaL_addvalue(&b);
      if (ar.istailcall)
        luaL_addstring(&b, "\n\t(...tail calls...)");
      found = (level <= last) && lua_sandboxnextlevel(L1, &ar);
    }
  }
  luaL_pushresult(&b);
}


/* ldblib.c's db_traceback */
static int sb_dbtraceback (lua_State *L) {
  int arg;
  lua_State *L1;
  const char *msg;
  if (lua_isthread(L, 1)) {
    arg = 1;
    L1 = lua_tothread(L, 1);
  }
  else {
    arg = 0;
    L1 = L;
  }
  msg = lua_tostring(L, arg + 1);
  if (msg == NULL && !lua_isnoneornil(L, arg + 1))  /* non-string 'msg'? */
    lua_pushvalue(L, arg + 1);  /* return it untouched */
  else {
    lua_Integer lv = luaL_optinteger(L, arg + 2, (L == L1) ? 1 : 0);
    /* LUA_SANDBOX: clamp the level, which 'sb_traceback' subtracts from the
       last level ('last - level' overflowed at -2^31, as in stock Lua; the
       cast to int truncated larger ones). Below 0 no level exists and above
       the stack's depth none is shown, so the clamp changes no output. */
    int level = (lv < -1) ? -1 : (lv > SB_MAXLEVEL) ? SB_MAXLEVEL : (int)lv;
    sb_traceback(L, L1, msg, level);
  }
  return 1;
}

/* }====================================================== */


/*
** {======================================================
** The run: its coroutine's body, error handler, tools
** =======================================================
*/

/* saves the traceback of an error for Error.traceback; returns it as is */
static int sb_onerror (lua_State *L) {
  if (!lua_sandbox_after(LUA_OK)) {  /* after an abort nothing more runs */
    size_t n;
    const char *s;
    sb_traceback(L, L, NULL, 1);
    s = lua_tolstring(L, -1, &n);
    lua_sandbox_save_traceback(L, s, n);
  }
  lua_settop(L, 1);
  return 1;
}


#define RUN_CALL	1	/* the chunk ran; call the 'call:' function */
#define RUN_DONE	2	/* the chunk or the function returned */

/*
** runner(chunk [, call_name, args...]): the body of the run coroutine.
** Returns true, results... or false, error object (never raises).  The
** stack is: 1 handler, 2 chunk, 3 call_name, 4... args.
*/
static int runner_k (lua_State *L, int status, lua_KContext ctx) {
  if (status != LUA_OK && status != LUA_YIELD) {
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2;
  }
  if (ctx == RUN_CALL) {
    int nargs = lua_gettop(L) - 3;
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    lua_pushvalue(L, 3);
    lua_rawget(L, -2);
    lua_remove(L, -2);
    if (lua_type(L, -1) != LUA_TFUNCTION) {
      lua_pushboolean(L, 0);
      lua_pushfstring(L, "global '%s' is not a function (got %s)",
                      lua_tostring(L, 3), luaL_typename(L, -2));
      return 2;
    }
    lua_insert(L, 4);
    status = lua_pcallk(L, nargs, LUA_MULTRET, 1, RUN_DONE, runner_k);
    return runner_k(L, status, RUN_DONE);
  }
  lua_pushboolean(L, 1);
  lua_insert(L, 4);
  return lua_gettop(L) - 3;
}


static int sb_runner (lua_State *L) {
  int status;
  int call;
  if (lua_gettop(L) < 2) lua_settop(L, 2);
  call = !lua_isnil(L, 2);
  lua_pushcfunction(L, sb_onerror);
  lua_insert(L, 1);
  lua_pushvalue(L, 2);  /* the chunk */
  status = lua_pcallk(L, 0, call ? 0 : LUA_MULTRET, 1,
                      call ? RUN_CALL : RUN_DONE, runner_k);
  return runner_k(L, status, call ? RUN_CALL : RUN_DONE);
}


/* configure(run_coroutine, max_source): per-run settings */
static int sb_configure (lua_State *L) {
  luaL_checktype(L, 1, LUA_TTHREAD);
  lua_settop(L, 2);
  lua_setfield(L, LUA_REGISTRYINDEX, SB_MAXSOURCE);
  lua_setfield(L, LUA_REGISTRYINDEX, SB_MAIN);
  return 0;
}


static int tool_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status; (void)ctx;
  /* the host's answer: true, results... | false, message */
  if (lua_toboolean(L, 1))
    return lua_gettop(L) - 1;
  lua_settop(L, 2);
  if (lua_type(L, 2) == LUA_TSTRING) {
    luaL_where(L, 1);
    lua_insert(L, -2);
    lua_concat(L, 2);
  }
  return lua_error(L);
}


/* tools.<name>(...): yields (TOOL, name, ...) up to the host */
static int tool_call (lua_State *L) {
  if (!lua_isyieldable(L))
    return luaL_error(L, "tool '%s' cannot be called here: the caller cannot "
      "yield (string.gsub callback, table.sort comparator or a metamethod "
      "called from C)", lua_tostring(L, lua_upvalueindex(1)));
  lua_getfield(L, LUA_REGISTRYINDEX, SB_TOOL);
  lua_insert(L, 1);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 2);
  return lua_yieldk(L, lua_gettop(L), 0, tool_k);
}


/* tool(name): the function for tools.<name> */
static int sb_tool (lua_State *L) {
  luaL_checkstring(L, 1);
  lua_settop(L, 1);
  lua_pushcclosure(L, tool_call, 1);
  return 1;
}

/* }====================================================== */


/*
** {======================================================
** Removed functions and libraries
** =======================================================
*/

/*
** Every "X is not available in this sandbox" is raised by one of the two
** functions below, and each counts the denial first (lua_sandbox_denied).
*/
static int unavailable (lua_State *L) {
  lua_sandbox_denied("", lua_tostring(L, lua_upvalueindex(1)));
  return luaL_error(L, "%s is not available in this sandbox%s",
                    lua_tostring(L, lua_upvalueindex(1)),
                    lua_tostring(L, lua_upvalueindex(2)));
}


static const char *const HINT_OUT = " (output goes through print and io.write)";
static const char *const HINT_IN =
  " (a script's input comes in through globals and tool calls)";


/* t[name] = stub for 'qual' (the table at 'idx') */
static void stub (lua_State *L, int idx, const char *qual, const char *name,
                  const char *hint) {
  idx = lua_absindex(L, idx);
  lua_pushfstring(L, "%s%s%s", qual, (*qual ? "." : ""), name);
  lua_pushstring(L, hint);
  lua_pushcclosure(L, unavailable, 2);
  lua_setfield(L, idx, name);
}


/* __index of 'package': raises for the fields stock Lua has there */
static int package_index (lua_State *L) {
  static const char *const removed[] = {"config", "cpath", "loadlib", "path",
    "preload", "searchers", "searchpath", NULL};
  const char *k = lua_tostring(L, 2);
  int i;
  if (lua_type(L, 2) == LUA_TSTRING)
    for (i = 0; removed[i]; i++)
      if (strcmp(k, removed[i]) == 0) {
        lua_sandbox_denied("package.", removed[i]);
        return luaL_error(L, "package.%s is not available in this sandbox "
                          "(require loads the built-in libraries and the "
                          "host's modules)", k);
      }
  return 0;
}


static void set_loaded (lua_State *L, const char *name) {
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, name);
  lua_pop(L, 1);
}

/* }====================================================== */


/*
** Installs everything above in the state's globals (the standard libraries
** string, table, math, utf8, coroutine and os are already open).  Returns
** the host's handles: tool marker, runner, configure, tool factory and
** set-modules (see src/sandbox.rs).
*/
int lua_sandbox_open_stock (lua_State *L) {
  static const char *const os_removed[] = {"execute", "exit", "getenv",
    "remove", "rename", "setlocale", "tmpname", NULL};
  static const char *const db_removed[] = {"debug", "gethook", "getinfo",
    "getlocal", "getmetatable", "getregistry", "getupvalue", "getuservalue",
    "sethook", "setcstacklimit", "setlocal", "setmetatable", "setupvalue",
    "setuservalue", "upvalueid", "upvaluejoin", NULL};
  static const char *const io_in[] = {"input", "lines", "read", NULL};
  static const char *const io_out[] = {"close", "open", "output", "popen",
    "tmpfile", "type", NULL};
  int i, g, io;
  lua_settop(L, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  g = lua_gettop(L);

  lua_pushcfunction(L, sb_print); lua_setfield(L, g, "print");
  lua_pushcfunction(L, sb_pcall); lua_setfield(L, g, "pcall");
  lua_pushcfunction(L, sb_xpcall); lua_setfield(L, g, "xpcall");
  lua_pushcfunction(L, sb_load); lua_setfield(L, g, "load");
  lua_pushcfunction(L, sb_collectgarbage);
  lua_setfield(L, g, "collectgarbage");
  lua_pushcfunction(L, sb_require); lua_setfield(L, g, "require");
  stub(L, g, "", "dofile", HINT_IN);
  stub(L, g, "", "loadfile", " (load takes source text)");

  /* coroutine */
  lua_getfield(L, g, "coroutine");
  lua_pushcfunction(L, lua_sandbox_open_corolib);
  lua_pushvalue(L, -2);
  lua_call(L, 1, 0);
  lua_pop(L, 1);

  /* string.dump */
  lua_getfield(L, g, "string");
  stub(L, -1, "string", "dump", " (bytecode is not available)");
  lua_pop(L, 1);

  /* os: time, clock, date, difftime of the original */
  lua_getfield(L, g, "os");
  lua_createtable(L, 0, 12);
  lua_getfield(L, -2, "time"); lua_setfield(L, -2, "time");
  lua_getfield(L, -2, "clock"); lua_setfield(L, -2, "clock");
  lua_getfield(L, -2, "date"); lua_setfield(L, -2, "date");
  lua_getfield(L, -2, "difftime"); lua_setfield(L, -2, "difftime");
  for (i = 0; os_removed[i]; i++) stub(L, -1, "os", os_removed[i], "");
  lua_pushvalue(L, -1); lua_setfield(L, g, "os");
  set_loaded(L, "os");
  lua_pop(L, 2);

  /* io: write and a stdout handle */
  lua_createtable(L, 0, 12);
  io = lua_gettop(L);
  lua_newuserdatauv(L, 0, 0);
  luaL_newmetatable(L, SB_FILE);
  lua_createtable(L, 0, 8);  /* methods */
  lua_pushcfunction(L, f_write); lua_setfield(L, -2, "write");
  lua_pushcfunction(L, f_flush); lua_setfield(L, -2, "flush");
  stub(L, -1, "file", "lines", HINT_IN);
  stub(L, -1, "file", "read", HINT_IN);
  stub(L, -1, "file", "close", HINT_OUT);
  stub(L, -1, "file", "seek", HINT_OUT);
  stub(L, -1, "file", "setvbuf", HINT_OUT);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, f_tostring); lua_setfield(L, -2, "__tostring");
  lua_setmetatable(L, -2);
  lua_setfield(L, io, "stdout");
  lua_pushvalue(L, io);
  lua_pushcclosure(L, io_write, 1); lua_setfield(L, io, "write");
  lua_pushcfunction(L, io_flush); lua_setfield(L, io, "flush");
  for (i = 0; io_in[i]; i++) stub(L, io, "io", io_in[i], HINT_IN);
  for (i = 0; io_out[i]; i++) stub(L, io, "io", io_out[i], HINT_OUT);
  lua_pushvalue(L, io); lua_setfield(L, g, "io");
  set_loaded(L, "io");
  lua_settop(L, g);

  /* debug: traceback only */
  lua_createtable(L, 0, 20);
  lua_pushcfunction(L, sb_dbtraceback); lua_setfield(L, -2, "traceback");
  for (i = 0; db_removed[i]; i++) stub(L, -1, "debug", db_removed[i], "");
  lua_pushvalue(L, -1); lua_setfield(L, g, "debug");
  set_loaded(L, "debug");
  lua_pop(L, 1);

  /* package: loaded, and an explanation for the rest */
  lua_createtable(L, 0, 1);
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_setfield(L, -2, "loaded");
  lua_createtable(L, 0, 2);
  lua_pushcfunction(L, package_index); lua_setfield(L, -2, "__index");
  lua_pushboolean(L, 0); lua_setfield(L, -2, "__metatable");
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1); lua_setfield(L, g, "package");
  set_loaded(L, "package");
  lua_pop(L, 1);

  /* the host's handles */
  lua_settop(L, 0);
  lua_newtable(L);  /* the tool marker */
  lua_pushvalue(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, SB_TOOL);
  lua_pushcfunction(L, sb_runner);
  lua_pushcfunction(L, sb_configure);
  lua_pushcfunction(L, sb_tool);
  lua_pushcfunction(L, sb_setmodules);
  return 5;
}
