/*
** sb_budget.h -- work-budget hooks shared by the sandbox's patched copies
** of Lua 5.4.9's lstrlib.c (sb_strlib.c) and ltablib.c (sb_tablib.c).
**
** Lua's count hook never fires inside a C function, so long-running
** builtins charge their work here instead.  The two functions below are
** implemented in Rust (src/hardened.rs).
*/

#ifndef sb_budget_h
#define sb_budget_h

#include "lua.h"


/*
** Charges 'steps' units of work to the running script's budget.
** Returns 0 to continue, nonzero once the run is aborted (sticky).
** Never raises and never touches the Lua state.
*/
extern int lua_sandbox_charge (lua_State *L, unsigned long long steps);

/*
** Message for the current abort: a static, NUL-terminated string.
*/
extern const char *lua_sandbox_abort_message (void);


/* exported openers: each expects a table at stack index 1 */
int lua_sandbox_open_strlib (lua_State *L);
int lua_sandbox_open_tablib (lua_State *L);


/* steps accumulated locally before calling 'lua_sandbox_charge' */
#define SB_BATCH		1000u

/*
** Bulk byte operations (memchr, memcmp, buffer copies) are much cheaper
** per byte than one step of the matcher; they are charged one step per
** SB_BYTES_PER_STEP bytes, plus one for the operation itself.
*/
#define SB_BYTES_PER_STEP	16u
#define sb_bytes(n)	(1u + (unsigned long long)(n) / SB_BYTES_PER_STEP)


/*
** Raises the abort message as a plain Lua string error (like the count
** hook does).  'lua_error' does not return.
*/
static void sb_raise (lua_State *L) {
  lua_pushstring(L, lua_sandbox_abort_message());
  lua_error(L);
}


/* charges the accumulated steps '*ctr', resets it, raises if aborted */
static void sb_flush (lua_State *L, unsigned long long *ctr) {
  unsigned long long n = *ctr;
  *ctr = 0;
  if (lua_sandbox_charge(L, n) != 0)
    sb_raise(L);
}


/* adds 'n' steps to counter 'ctr' (an lvalue); charges every SB_BATCH */
#define sb_count(L,ctr,n)  \
  do { if (((ctr) += (unsigned long long)(n)) >= SB_BATCH) sb_flush(L, &(ctr)); } \
  while (0)


#endif
