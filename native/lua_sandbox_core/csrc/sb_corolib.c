/*
** sb_corolib.c -- Lua 5.4.9's coroutine library (lcorolib.c) for the
** sandbox.  Copyright (C) 1994-2025 Lua.org, PUC-Rio; see LICENSE-lua.
**
** Changes against lcorolib.c, each marked LUA_SANDBOX:
**  - The run coroutine looks like the main thread: 'running' says ismain,
**    'isyieldable' says false, and 'yield' there raises stock Lua's
**    "attempt to yield from outside a coroutine".
**  - A tool call (a yield whose first value is the SB_TOOL marker) made
**    inside a coroutine the script resumed is forwarded: 'resume' and the
**    'wrap' function yield it on to their own resumer (up to the host) and
**    resume the coroutine with the answer, through continuations, so the
**    script never sees the marker.
**  - After every resume and close the run's abort is checked (sticky aborts,
**    and a memory error inside a coroutine trips the memory abort).
** Everything else, messages and names included, is the original.
*/

#define LUA_LIB

#include "lprefix.h"

#include <string.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"

#include "sb_sandbox.h"


static lua_State *getco (lua_State *L) {
  lua_State *co = lua_tothread(L, 1);
  luaL_argexpected(L, co, 1, "thread");
  return co;
}


/*
** Resumes a coroutine. Returns the number of results for non-error
** cases or -1 for errors.
*/
static int auxresume (lua_State *L, lua_State *co, int narg) {
  int status, nres;
  if (l_unlikely(!lua_checkstack(co, narg))) {
    lua_pushliteral(L, "too many arguments to resume");
    return -1;  /* error flag */
  }
  lua_xmove(L, co, narg);
  status = lua_resume(co, L, narg, &nres);
  sb_after(L, status);  /* LUA_SANDBOX */
  if (l_likely(status == LUA_OK || status == LUA_YIELD)) {
    if (l_unlikely(!lua_checkstack(L, nres + 1))) {
      lua_pop(co, nres);  /* remove results anyway */
      lua_pushliteral(L, "too many results to resume");
      return -1;  /* error flag */
    }
    lua_xmove(co, L, nres);  /* move yielded values */
    return nres;
  }
  else {
    lua_xmove(co, L, 1);  /* move error message */
    return -1;  /* error flag */
  }
}


/*
** LUA_SANDBOX: did 'co' just yield a tool call?  Its 'nres' values are on
** the top of L.
*/
static int istoolcall (lua_State *L, lua_State *co, int nres) {
  int r;
  if (nres < 1 || lua_status(co) != LUA_YIELD)
    return 0;
  lua_getfield(L, LUA_REGISTRYINDEX, SB_TOOL);
  r = lua_rawequal(L, -1, -(nres + 1));
  lua_pop(L, 1);
  return r;
}


/*
** LUA_SANDBOX: passes a tool call on.  'forward' yields its arguments (the
** tool call) to whoever resumed the current coroutine and returns what it
** is resumed with (the host's answer).  It runs as a frame of its own so the
** frame of 'resume' keeps its slots: mlua empties the top frame of the run
** coroutine when that yields to the host.
*/
static int forward_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status; (void)ctx;
  return lua_gettop(L);
}


static int forward (lua_State *L) {
  return lua_yieldk(L, lua_gettop(L), 0, forward_k);
}


/* calls 'forward' with the 'r' values on the top; continues in 'k' */
static int forwardcall (lua_State *L, int r, lua_KFunction k) {
  lua_pushcfunction(L, forward);
  lua_insert(L, -(r + 1));
  lua_callk(L, r, LUA_MULTRET, 0, k);
  return k(L, LUA_OK, 0);
}


static int coresume_k (lua_State *L, int status, lua_KContext ctx);

static int coresume_aux (lua_State *L, lua_State *co, int narg) {
  int r;
  r = auxresume(L, co, narg);
  if (istoolcall(L, co, r))  /* LUA_SANDBOX: pass it up, resume with the answer */
    return forwardcall(L, r, coresume_k);
  if (l_unlikely(r < 0)) {
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2;  /* return false + error message */
  }
  else {
    lua_pushboolean(L, 1);
    lua_insert(L, -(r + 1));
    return r + 1;  /* return true + 'resume' returns */
  }
}


/* LUA_SANDBOX: back from a forwarded tool call; the answer is above 'co' */
static int coresume_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status; (void)ctx;
  return coresume_aux(L, lua_tothread(L, 1), lua_gettop(L) - 1);
}


static int luaB_coresume (lua_State *L) {
  lua_State *co = getco(L);
  return coresume_aux(L, co, lua_gettop(L) - 1);
}


static int auxwrap_k (lua_State *L, int status, lua_KContext ctx);

static int auxwrap_aux (lua_State *L, int narg) {
  lua_State *co = lua_tothread(L, lua_upvalueindex(1));
  int r = auxresume(L, co, narg);
  if (istoolcall(L, co, r))  /* LUA_SANDBOX: pass it up, resume with the answer */
    return forwardcall(L, r, auxwrap_k);
  if (l_unlikely(r < 0)) {  /* error? */
    int stat = lua_status(co);
    if (stat != LUA_OK && stat != LUA_YIELD) {  /* error in the coroutine? */
      stat = lua_closethread(co, L);  /* close its tbc variables */
      sb_after(L, stat);  /* LUA_SANDBOX */
      lua_xmove(co, L, 1);  /* move error message to the caller */
    }
    if (stat != LUA_ERRMEM &&  /* not a memory error and ... */
        lua_type(L, -1) == LUA_TSTRING) {  /* ... error object is a string? */
      luaL_where(L, 1);  /* add extra info, if available */
      lua_insert(L, -2);
      lua_concat(L, 2);
    }
    return lua_error(L);  /* propagate error */
  }
  return r;
}


/* LUA_SANDBOX: back from a forwarded tool call; the answer is the stack */
static int auxwrap_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status; (void)ctx;
  return auxwrap_aux(L, lua_gettop(L));
}


static int luaB_auxwrap (lua_State *L) {
  return auxwrap_aux(L, lua_gettop(L));
}


static int luaB_cocreate (lua_State *L) {
  lua_State *NL;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  NL = lua_newthread(L);
  lua_pushvalue(L, 1);  /* move function to top */
  lua_xmove(L, NL, 1);  /* move function from L to NL */
  return 1;
}


static int luaB_cowrap (lua_State *L) {
  luaB_cocreate(L);
  lua_pushcclosure(L, luaB_auxwrap, 1);
  return 1;
}


static int luaB_yield (lua_State *L) {
  if (sb_is_main(L, L)) {  /* LUA_SANDBOX: as lua_yieldk on the main thread */
    lua_pushliteral(L, "attempt to yield from outside a coroutine");
    return lua_error(L);
  }
  return lua_yield(L, lua_gettop(L));
}


#define COS_RUN		0
#define COS_DEAD	1
#define COS_YIELD	2
#define COS_NORM	3


static const char *const statname[] =
  {"running", "dead", "suspended", "normal"};


static int auxstatus (lua_State *L, lua_State *co) {
  if (L == co) return COS_RUN;
  else {
    switch (lua_status(co)) {
      case LUA_YIELD:
        return COS_YIELD;
      case LUA_OK: {
        lua_Debug ar;
        if (lua_getstack(co, 0, &ar))  /* does it have frames? */
          return COS_NORM;  /* it is running */
        else if (lua_gettop(co) == 0)
            return COS_DEAD;
        else
          return COS_YIELD;  /* initial state */
      }
      default:  /* some error occurred */
        return COS_DEAD;
    }
  }
}


static int luaB_costatus (lua_State *L) {
  lua_State *co = getco(L);
  lua_pushstring(L, statname[auxstatus(L, co)]);
  return 1;
}


static int luaB_yieldable (lua_State *L) {
  lua_State *co = lua_isnone(L, 1) ? L : getco(L);
  /* LUA_SANDBOX: the run coroutine is the script's main thread */
  lua_pushboolean(L, lua_isyieldable(co) && !sb_is_main(L, co));
  return 1;
}


static int luaB_corunning (lua_State *L) {
  int ismain = lua_pushthread(L);
  lua_pushboolean(L, ismain || sb_is_main(L, L));  /* LUA_SANDBOX */
  return 2;
}


static int luaB_close (lua_State *L) {
  lua_State *co = getco(L);
  int status = auxstatus(L, co);
  switch (status) {
    case COS_DEAD: case COS_YIELD: {
      status = lua_closethread(co, L);
      sb_after(L, status);  /* LUA_SANDBOX */
      if (status == LUA_OK) {
        lua_pushboolean(L, 1);
        return 1;
      }
      else {
        lua_pushboolean(L, 0);
        lua_xmove(co, L, 1);  /* move error message */
        return 2;
      }
    }
    default:  /* normal or running coroutine */
      return luaL_error(L, "cannot close a %s coroutine", statname[status]);
  }
}


static const luaL_Reg co_funcs[] = {
  {"create", luaB_cocreate},
  {"resume", luaB_coresume},
  {"running", luaB_corunning},
  {"status", luaB_costatus},
  {"wrap", luaB_cowrap},
  {"yield", luaB_yield},
  {"isyieldable", luaB_yieldable},
  {"close", luaB_close},
  {NULL, NULL}
};


/*
** LUA_SANDBOX: replaces the functions of the 'coroutine' table at stack
** index 1 (the one luaopen_coroutine made, also in package.loaded).
*/
int lua_sandbox_open_corolib (lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  luaL_setfuncs(L, co_funcs, 0);
  return 0;
}
