/*
** sb_sandbox.h -- what the sandbox's C replacements of Lua's base, io,
** debug, package and coroutine functions (sb_baselib.c, sb_corolib.c)
** share: registry keys and the hooks implemented in Rust (src/hooks.rs).
*/

#ifndef sb_sandbox_h
#define sb_sandbox_h

#include <stddef.h>

#include "lua.h"
#include "lauxlib.h"


/* registry fields */
#define SB_MAIN		"lua_sandbox.main"	/* the run coroutine */
#define SB_TOOL		"lua_sandbox.tool"	/* marker of a tool-call yield */
#define SB_MAXSOURCE	"lua_sandbox.max_source"	/* bound of 'load' */
#define SB_MODULES	"lua_sandbox.modules"	/* host modules: name -> loader */


/*
** Appends 'n' bytes to the run's output (print, io.write).  Returns 0, or
** nonzero once the run is aborted (over max_output).  Never raises.
*/
extern int lua_sandbox_emit (lua_State *L, const char *s, size_t n);

/*
** Called after every protected call and resume with its status: a
** LUA_ERRMEM status trips the (sticky) memory abort.  Returns nonzero
** when the run is aborted.  Never raises.
*/
extern int lua_sandbox_after (int status);

/*
** Counts a capability the script was denied ('prefix' .. 'name', e.g.
** "os.getenv"): stats.denied, the metrics and the audit log.  Never raises.
*/
extern void lua_sandbox_denied (const char *prefix, const char *name);

/* Saves the traceback of the run's error (for Error.traceback). */
extern void lua_sandbox_save_traceback (lua_State *L, const char *s, size_t n);

/* The current abort's message (a static string, the ticker's text). */
extern const char *lua_sandbox_stock_abort_message (void);


/* Raises the current abort (a plain string error, like the ticker). */
#define sb_raise_abort(L)  \
  (lua_pushstring(L, lua_sandbox_stock_abort_message()), lua_error(L))

/* After a protected call or resume that ended with 'status'. */
#define sb_after(L,status)  \
  do { if (lua_sandbox_after(status)) sb_raise_abort(L); } while (0)


/* is 'co' the run coroutine (which the script must see as the main thread)? */
static int sb_is_main (lua_State *L, lua_State *co) {
  int r;
  lua_getfield(L, LUA_REGISTRYINDEX, SB_MAIN);
  r = (lua_tothread(L, -1) == co);
  lua_pop(L, 1);
  return r;
}


int lua_sandbox_open_corolib (lua_State *L);
int lua_sandbox_open_stock (lua_State *L);

#endif
