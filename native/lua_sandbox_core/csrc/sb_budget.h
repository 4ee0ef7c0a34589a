/*
** sb_budget.h -- work-budget hooks shared by the sandbox's patched copies
** of Lua 5.4.9's lstrlib.c (sb_strlib.c) and ltablib.c (sb_tablib.c).
**
** Lua's count hook never fires inside a C function, so long-running
** builtins charge their work here instead, through
** 'lua_sandboxcharge' of the patched VM (vendor/lua-src/PATCHES.md).
*/

#ifndef sb_budget_h
#define sb_budget_h

#include "lua.h"


/*
** The charging primitive is the VM's own (lua.h, 'lua_sandboxcharge'): it
** takes units from the state's work countdown, the one the instructions
** use, and when that runs out calls the ticker (budget.rs), which books the
** work, checks for a kill and, once the run is aborted (sticky), makes the
** charge raise the abort message as a plain string error, exactly like a
** tick in the VM.  It raises only where 'luaL_error' could.
*/

/* exported openers: each expects a table at stack index 1 */
int lua_sandbox_open_strlib (lua_State *L);
int lua_sandbox_open_tablib (lua_State *L);


/* steps accumulated locally before calling 'lua_sandboxcharge' */
#define SB_BATCH		1000u

/*
** Bulk byte operations (memchr, memcmp, buffer copies) are much cheaper
** per byte than one step of the matcher; they are charged one step per
** SB_BYTES_PER_STEP bytes, plus one for the operation itself.
*/
#define SB_BYTES_PER_STEP	16u
#define sb_bytes(n)	(1u + (unsigned long long)(n) / SB_BYTES_PER_STEP)


/* charges the accumulated steps '*ctr', resets it; raises once aborted */
static void sb_flush (lua_State *L, unsigned long long *ctr) {
  unsigned long long n = *ctr;
  *ctr = 0;
  lua_sandboxcharge(L, (lua_Integer)n);
}


/* adds 'n' steps to counter 'ctr' (an lvalue); charges every SB_BATCH */
#define sb_count(L,ctr,n)  \
  do { if (((ctr) += (unsigned long long)(n)) >= SB_BATCH) sb_flush(L, &(ctr)); } \
  while (0)


#endif
