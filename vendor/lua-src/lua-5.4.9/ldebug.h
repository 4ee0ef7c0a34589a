/*
** $Id: ldebug.h $
** Auxiliary functions from Debug Interface module
** See Copyright Notice in lua.h
*/

#ifndef ldebug_h
#define ldebug_h


#include "lstate.h"


#define pcRel(pc, p)	(cast_int((pc) - (p)->code) - 1)


/* Active Lua function (given call info) */
#define ci_func(ci)		(clLvalue(s2v((ci)->func.p)))


#define resethookcount(L)	(L->hookcount = L->basehookcount)

/*
** mark for entries in 'lineinfo' array that has absolute information in
** 'abslineinfo' array
*/
#define ABSLINEINFO	(-0x80)


/*
** MAXimum number of successive Instructions WiTHout ABSolute line
** information. (A power of two allows fast divisions.)
*/
#if !defined(MAXIWTHABS)
#define MAXIWTHABS	128
#endif


LUAI_FUNC int luaG_getfuncline (const Proto *f, int pc);
LUAI_FUNC const char *luaG_findlocal (lua_State *L, CallInfo *ci, int n,
                                                    StkId *pos);
LUAI_FUNC l_noret luaG_typeerror (lua_State *L, const TValue *o,
                                                const char *opname);
LUAI_FUNC l_noret luaG_callerror (lua_State *L, const TValue *o);
LUAI_FUNC l_noret luaG_forerror (lua_State *L, const TValue *o,
                                               const char *what);
LUAI_FUNC l_noret luaG_concaterror (lua_State *L, const TValue *p1,
                                                  const TValue *p2);
LUAI_FUNC l_noret luaG_opinterror (lua_State *L, const TValue *p1,
                                                 const TValue *p2,
                                                 const char *msg);
LUAI_FUNC l_noret luaG_tointerror (lua_State *L, const TValue *p1,
                                                 const TValue *p2);
LUAI_FUNC l_noret luaG_ordererror (lua_State *L, const TValue *p1,
                                                 const TValue *p2);
LUAI_FUNC l_noret luaG_runerror (lua_State *L, const char *fmt, ...);
LUAI_FUNC const char *luaG_addinfo (lua_State *L, const char *msg,
                                                  TString *src, int line);
LUAI_FUNC l_noret luaG_errormsg (lua_State *L);
LUAI_FUNC int luaG_traceexec (lua_State *L, const Instruction *pc);
LUAI_FUNC void luaG_sandboxtick (lua_State *L, const Instruction *pc);
/* LUA_SANDBOX: the charging primitives (see the discipline in ldebug.c) */
LUAI_FUNC void luaG_sandboxcharge (lua_State *L, l_mem n);
LUAI_FUNC void luaG_sandboxmemerr (lua_State *L);
LUAI_FUNC int luaG_sandboxaborted (lua_State *L);
/* LUA_SANDBOX: at every n-th step 'i' (n a power of 2) of a loop that may
   not raise, asks the ticker ('lua_sandboxcheckevery' for loops that may);
   true when the run is aborted (the next instruction or charge raises) */
#define luaG_sandboxabortedevery(L,i,n)  \
  (l_unlikely((((i) + 1) & ((n) - 1)) == 0) && luaG_sandboxaborted(L))
/* LUA_SANDBOX: steps of walks along linked lists (the CallInfos of a deep
   recursion, its open upvalues) between two checks. Each step is a likely
   cache miss, ~25 ns measured (a 170 000-frame list: ~4 ms), so a piece is
   ~0.1 ms; LUA_SBVALUES of them was ~0.85 ms. The steps are counted in the
   global state, all walks together: an error unwinding 200 nested
   coroutines of 1 000 frames each makes 200 walks of 1 000 steps (~2.7 ms
   with no check when each walk counted its own) */
#define SB_WALKPIECE	4096
/* one step of such a walk; at every SB_WALKPIECE-th step of all of them:
   debits the piece (a unit per 8 steps, as the collector's work) and asks
   the ticker (not from inside the ticker, whose test build reads frames);
   true when the run is aborted. Never raises */
#define luaG_sandboxwalked(L)  \
  (l_unlikely((++G(L)->sbwalked & (SB_WALKPIECE - 1)) == 0) &&  \
   !G(L)->sbticking &&  \
   (luaG_sandboxdebit(L, SB_WALKPIECE >> 3), luaG_sandboxaborted(L)))
LUAI_FUNC void luaG_sandboxcheck (lua_State *L);
LUAI_FUNC size_t luaG_sandboxcopy (lua_State *L, void *dst, const void *src,
                                   size_t n);
LUAI_FUNC void luaG_sandboxcopyorraise (lua_State *L, void *dst,
                                        const void *src, size_t n);
LUAI_FUNC size_t luaG_sandboxstrlen (lua_State *L, const char *s);
#define luaG_sandboxdebit(L,n)	(G(L)->sbticks -= cast(l_mem, (n)))
/* LUA_SANDBOX: units of work for 'n' bytes copied, compared or scanned */
#define SB_BYTESHIFT	4
#define luaG_sbbytes(n)	(cast(l_mem, (n)) >> SB_BYTESHIFT)
LUAI_FUNC int luaG_tracecall (lua_State *L);


#endif
