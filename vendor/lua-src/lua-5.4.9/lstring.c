/*
** $Id: lstring.c $
** String table (keeps all strings handled by Lua)
** See Copyright Notice in lua.h
*/

#define lstring_c
#define LUA_CORE

#include "lprefix.h"


#include <string.h>

#include "lua.h"

#include "ldebug.h"
#include "ldo.h"
#include "lmem.h"
#include "lobject.h"
#include "lstate.h"
#include "lstring.h"


/*
** Maximum size for string table.
*/
#define MAXSTRTB	cast_int(luaM_limitN(MAX_INT, TString*))


/*
** equality for long strings
*/
int luaS_eqlngstr (TString *a, TString *b) {
  size_t len = a->u.lnglen;
  lua_assert(a->tt == LUA_VLNGSTR && b->tt == LUA_VLNGSTR);
  return (a == b) ||  /* same instance or... */
    ((len == b->u.lnglen) &&  /* equal length and ... */
     /* LUA_SANDBOX: ... equal hashes, when both are known (table keys always
        are: long keys that collide in one chain then cost no 'memcmp') ... */
     (a->extra == 0 || b->extra == 0 || a->hash == b->hash) &&
     (memcmp(getlngstr(a), getlngstr(b), len) == 0));  /* equal contents */
}


/*
** LUA_SANDBOX: the hash's loop, continuing 'h' over 'str[0..l)' from its
** last byte down (stock 'luaS_hash' is 'hashdown(seed ^ l, str, l)'). So a
** string can be hashed in pieces, the last piece first, with the very same
** value: 'hashdown(h, s, a + b)' is 'hashdown(hashdown(h, s + a, b), s, a)'.
*/
static unsigned int hashdown (unsigned int h, const char *str, size_t l) {
  for (; l > 0; l--)
    h ^= ((h<<5) + (h>>2) + cast_byte(str[l - 1]));
  return h;
}


/*
** LUA_SANDBOX: 'luaS_eqlngstr' for a running state, used by table lookups:
** one that finds its long key compares it whole ('memcmp', ~0.1 ms per MiB),
** so the compare is done in pieces of LUA_SBPIECE bytes with a non-raising
** question to the ticker between two (its units are the lookup's). Returns
** 1 (equal), 0 (different), or -1 when the run was aborted before the
** answer: the lookup then answers "absent", as for an interrupted hash.
*/
int luaS_eqlngstrc (lua_State *L, TString *a, TString *b) {
  size_t len = a->u.lnglen;
  size_t done = 0;
  lua_assert(a->tt == LUA_VLNGSTR && b->tt == LUA_VLNGSTR);
  if (a == b)
    return 1;
  if (len != b->u.lnglen ||
      (a->extra != 0 && b->extra != 0 && a->hash != b->hash))
    return 0;
  while (len - done > LUA_SBPIECE) {
    if (memcmp(getlngstr(a) + done, getlngstr(b) + done, LUA_SBPIECE) != 0)
      return 0;
    done += LUA_SBPIECE;
    if (luaG_sandboxaborted(L))
      return -1;
  }
  return memcmp(getlngstr(a) + done, getlngstr(b) + done, len - done) == 0;
}


unsigned int luaS_hash (const char *str, size_t l, unsigned int seed) {
  return hashdown(seed ^ cast_uint(l), str, l);  /* LUA_SANDBOX */
}


unsigned int luaS_hashlongstr (TString *ts) {
  lua_assert(ts->tt == LUA_VLNGSTR);
  if (ts->extra == 0) {  /* no hash? */
    size_t len = ts->u.lnglen;
    ts->hash = luaS_hash(getlngstr(ts), len, ts->hash);
    ts->extra = 1;  /* now it has its hash */
  }
  return ts->hash;
}


/*
** LUA_SANDBOX: 'luaS_hashlongstr' for a running state, which every table
** lookup and insert with a long-string key goes through first. The hash
** reads every byte (~1 ns each: 16 MiB took ~17 ms with no check), so it
** is done in pieces of LUA_SBPIECE bytes, the last one first (see
** 'hashdown'), each debited one unit per 16 bytes and followed by a
** non-raising question to the ticker ('luaG_sandboxaborted'): lookups may
** not raise ('lua_rawget', 'luaH_next'). Returns 1 once the hash is known;
** 0 when the run was aborted meanwhile: the string is then left exactly as
** it was (no hash, 'extra' still 0, its seed in 'hash'), and the caller
** answers "absent" (a lookup: nothing can act on it, the next instruction
** or charge raises) or raises (an insert, 'luaH_newkey').
*/
int luaS_hashlongstrc (lua_State *L, TString *ts) {
  lua_assert(ts->tt == LUA_VLNGSTR);
  if (ts->extra == 0) {  /* no hash? */
    const char *str = getlngstr(ts);
    size_t l = ts->u.lnglen;
    unsigned int h = ts->hash ^ cast_uint(l);  /* the seed, as 'luaS_hash' */
    while (l > LUA_SBPIECE) {
      l -= LUA_SBPIECE;
      h = hashdown(h, str + l, LUA_SBPIECE);
      luaG_sandboxdebit(L, luaG_sbbytes(LUA_SBPIECE));
      if (luaG_sandboxaborted(L))
        return 0;  /* nothing set: the string is as it was */
    }
    h = hashdown(h, str, l);
    luaG_sandboxdebit(L, luaG_sbbytes(l));
    ts->hash = h;
    ts->extra = 1;  /* now it has its hash */
  }
  return 1;
}


/*
** LUA_SANDBOX: the string table resizes in pieces (see PATCHES.md, "The
** string table in pieces"). Stock Lua rehashed every short string in one
** go when a new one filled the table and when the collector halved it:
** ~40 ns per string (a cache miss each), 1-4 ms at 10^5-10^6 strings and
** ~70 ms at 2 M, with no check inside. Here the buckets live in segments of
** LUAI_STRSEG pointers (lstate.h), so the table is never copied or cleared
** whole, and a resize is linear hashing: a doubling from 's' buckets to
** '2s' splits bucket 'i' of the small table into 'i' and 'i + s' for 'i'
** ascending, a halving merges bucket 'i + s' into 'i' for 'i' descending;
** 'k' is the boundary. During both, string 'h' is in bucket 'h % 2s' when
** 'h % s' is below 'k' and in bucket 'h % s' otherwise ('strbucket'), and
** every operation leaves the table consistent: a lookup, an insert or a
** removal (the collector's sweep) can happen between any two steps, and an
** aborted run leaves nothing to undo (a 'rollback: false' session keeps
** using the table as it is, and later steps finish the resize).
** Steps are taken by every new short string ('internshrstr': STRTSTEP
** buckets) and by every sweep step of the collector ('luaS_resizestep');
** a resize asked for while one is in progress waits for it to finish.
*/
#define STRTSTEP	8

/* the slot of bucket 'i' */
#define strslot(tb,i)	(&(tb)->seg[(i) >> LUAI_STRSEGBITS] \
                                   [(i) & (LUAI_STRSEG - 1)])

/* LUA_SANDBOX: the bucket of hash 'h', split or not (see above) */
static TString **strbucket (stringtable *tb, unsigned int h) {
  unsigned int j = lmod(h, tb->size);
  unsigned int lo = lmod(h, tb->small);
  if (lo >= cast_uint(tb->k))  /* merged, or not split yet? */
    j = lo;
  return strslot(tb, j);
}


/* LUA_SANDBOX: split bucket 'i' of the small table into 'i' and 'i + s' */
static void splitbucket (stringtable *tb, int i) {
  int s = tb->small;
  TString **lo = strslot(tb, i);
  TString **hi = strslot(tb, i + s);  /* never read before this write */
  TString *p = *lo;
  *lo = *hi = NULL;
  while (p) {
    TString *hnext = p->u.hnext;
    TString **l = (p->hash & cast_uint(s)) ? hi : lo;
    p->u.hnext = *l;
    *l = p;
    p = hnext;
  }
}


/* LUA_SANDBOX: merge bucket 'i + s' into 'i' */
static void mergebucket (stringtable *tb, int i) {
  TString **lo = strslot(tb, i);
  TString *p = *strslot(tb, i + tb->small);
  while (p) {
    TString *hnext = p->u.hnext;
    p->u.hnext = *lo;
    *lo = p;
    p = hnext;
  }
}


/*
** LUA_SANDBOX: a halving is done: segments holding only buckets at or
** above 'small + k' are never read again (a lookup reads bucket 'h % size'
** only when 'h % small' is below 'k'): they are freed as 'k' passes them,
** and 'seg[0]' is shrunk at the end when the table fits in one segment (a
** shrink, which Lua's allocator contract says never fails; were it refused
** the larger block is simply kept).
*/
static void freemerged (lua_State *L, stringtable *tb) {
  while (tb->nseg > 1 &&
         ((tb->nseg - 1) << LUAI_STRSEGBITS) >= tb->small + tb->k) {
    tb->nseg--;
    luaM_freearray(L, tb->seg[tb->nseg], LUAI_STRSEG);
    tb->seg[tb->nseg] = NULL;
  }
  if (tb->k == 0) {  /* every bucket merged? */
    int s = tb->small;
    if (s < tb->seg0) {
      TString **v = luaM_reallocvector(L, tb->seg[0], tb->seg0, s, TString*);
      if (v != NULL) {
        tb->seg[0] = v;
        tb->seg0 = s;
      }
    }
    tb->size = s;
    tb->shrinking = 0;
  }
}


/*
** LUA_SANDBOX: advance the resize in progress by up to 'n' buckets; returns
** how many were split or merged (0 when none is in progress). Never raises
** and never allocates (a halving only frees). Each bucket holds about one
** string, so the work of a step is bounded by 'n' (a string table whose
** chains are long is slow to search as well).
*/
int luaS_resizestep (lua_State *L, int n) {
  stringtable *tb = &G(L)->strt;
  int done = 0;
  while (done < n && tb->small < tb->size) {
    if (!tb->shrinking) {
      splitbucket(tb, tb->k);
      if (++tb->k == tb->small) {  /* every bucket split? */
        tb->small = tb->size;
        tb->k = 0;
      }
    }
    else {
      if (tb->k > 0) {  /* (0 when a doubling turned back at its start) */
        tb->k--;
        mergebucket(tb, tb->k);
      }
      freemerged(L, tb);
    }
    done++;
  }
  return done;
}


/*
** LUA_SANDBOX: start a doubling: the new buckets 'size' to '2 size - 1'
** get their room (a larger 'seg[0]' while the table fits in one segment,
** new segments after it), never cleared: bucket 'i + s' is written when
** bucket 'i' is split, before any lookup can read it. If an allocation
** fails the table keeps its size (as stock Lua) and a segment allocated
** meanwhile is kept for the next attempt.
*/
static void startgrowth (lua_State *L, stringtable *tb, int nsize) {
  if (nsize <= LUAI_STRSEG) {
    if (tb->seg0 < nsize) {
      TString **v = luaM_reallocvector(L, tb->seg[0], tb->seg0, nsize,
                                       TString*);
      if (v == NULL)
        return;
      tb->seg[0] = v;
      tb->seg0 = nsize;
    }
  }
  else {
    int nseg = nsize >> LUAI_STRSEGBITS;
    if (tb->dirsize < nseg) {
      TString ***d = luaM_reallocvector(L, tb->seg, tb->dirsize, nseg,
                                        TString**);
      if (d == NULL)
        return;
      tb->seg = d;
      tb->dirsize = nseg;
    }
    while (tb->nseg < nseg) {
      TString **v = luaM_reallocvector(L, NULL, 0, LUAI_STRSEG, TString*);
      if (v == NULL)
        return;
      tb->seg[tb->nseg++] = v;
    }
  }
  tb->small = tb->size;
  tb->size = nsize;
  tb->k = 0;
  tb->shrinking = 0;
}


/*
** Resize the string table. If allocation fails, keep the current size.
** (This can degrade performance, but any non-zero size should work
** correctly.)
** LUA_SANDBOX: only starts the resize (to twice or half the size), which
** later steps carry out ('luaS_resizestep'); nothing while one is in
** progress. Its work, one split or merge per bucket of the smaller size,
** is paid by those steps, 3 units of the collector's work per bucket (two
** slots and about one string moved; one unit per 8 of them, as the
** collector's), so counts depend only on the strings a run creates.
*/
void luaS_resize (lua_State *L, int nsize) {
  stringtable *tb = &G(L)->strt;
  if (tb->small < tb->size) {  /* a resize in progress? */
    /* a doubling in progress turns into the halving back to its smaller
       size: the table is the same (buckets below 'k' split, the others
       not), and the halving merges those split so far; its new segments,
       never written above 'small + k', are freed at its first step */
    if (!tb->shrinking && nsize == tb->small)
      tb->shrinking = 1;
    return;  /* any other waits */
  }
  if (nsize > tb->size)
    startgrowth(L, tb, nsize);
  else if (nsize < tb->size && nsize > 0) {
    lua_assert(nsize * 2 == tb->size);
    tb->small = nsize;
    tb->k = nsize;  /* every bucket split: merge from the top */
    tb->shrinking = 1;
  }
}


/* LUA_SANDBOX: free the string table (closing the state) */
void luaS_freetable (lua_State *L) {
  stringtable *tb = &G(L)->strt;
  if (tb->seg != NULL) {
    int i;
    for (i = 0; i < tb->nseg; i++)
      luaM_freearray(L, tb->seg[i], (i == 0) ? tb->seg0 : LUAI_STRSEG);
    luaM_freearray(L, tb->seg, tb->dirsize);
    tb->seg = NULL;
    tb->nseg = tb->dirsize = 0;
  }
}


/*
** Clear API string cache. (Entries cannot be empty, so fill them with
** a non-collectable string.)
*/
void luaS_clearcache (global_State *g) {
  int i, j;
  for (i = 0; i < STRCACHE_N; i++)
    for (j = 0; j < STRCACHE_M; j++) {
      if (iswhite(g->strcache[i][j]))  /* will entry be collected? */
        g->strcache[i][j] = g->memerrmsg;  /* replace it with something fixed */
    }
}


/*
** Initialize the string table and the string cache
*/
void luaS_init (lua_State *L) {
  global_State *g = G(L);
  int i, j;
  stringtable *tb = &G(L)->strt;
  /* LUA_SANDBOX: one segment of MINSTRTABSIZE buckets */
  tb->seg = luaM_newvector(L, 1, TString**);
  tb->dirsize = 1;
  tb->seg[0] = luaM_newvector(L, MINSTRTABSIZE, TString*);
  tb->seg0 = MINSTRTABSIZE;
  tb->nseg = 1;
  for (i = 0; i < MINSTRTABSIZE; i++)  /* clear array */
    tb->seg[0][i] = NULL;
  tb->size = tb->small = MINSTRTABSIZE;
  tb->k = 0;
  tb->shrinking = 0;
  /* pre-create memory-error message */
  g->memerrmsg = luaS_newliteral(L, MEMERRMSG);
  luaC_fix(L, obj2gco(g->memerrmsg));  /* it should never be collected */
  for (i = 0; i < STRCACHE_N; i++)  /* fill cache with valid strings */
    for (j = 0; j < STRCACHE_M; j++)
      g->strcache[i][j] = g->memerrmsg;
}



/*
** creates a new string object
*/
static TString *createstrobj (lua_State *L, size_t l, int tag, unsigned int h) {
  TString *ts;
  GCObject *o;
  size_t totalsize;  /* total size of TString object */
  totalsize = sizelstring(l);
  o = luaC_newobj(L, tag, totalsize);
  ts = gco2ts(o);
  ts->hash = h;
  ts->extra = 0;
  getstr(ts)[l] = '\0';  /* ending 0 */
  return ts;
}


/*
** LUA_SANDBOX: a long string is charged once, when created, one unit per 16
** bytes (its hash, computed at most once, is charged by the table lookup
** that needs it: 'luaS_hashlongstr' has no state). The debit never raises:
** 'lua_pushlstring' must only fail for lack of memory (mlua relies on it).
*/
TString *luaS_createlngstrobj (lua_State *L, size_t l) {
  TString *ts;
  luaG_sandboxdebit(L, luaG_sbbytes(l));
  ts = createstrobj(L, l, LUA_VLNGSTR, G(L)->seed);
  ts->u.lnglen = l;
  ts->shrlen = 0xFF;  /* signals that it is a long string */
  return ts;
}


void luaS_remove (lua_State *L, TString *ts) {
  stringtable *tb = &G(L)->strt;
  TString **p = strbucket(tb, ts->hash);  /* LUA_SANDBOX */
  while (*p != ts)  /* find previous element */
    p = &(*p)->u.hnext;
  *p = (*p)->u.hnext;  /* remove element from its list */
  tb->nuse--;
}


static void growstrtab (lua_State *L, stringtable *tb) {
  if (l_unlikely(tb->nuse == MAX_INT)) {  /* too many strings? */
    luaC_fullgc(L, 1);  /* try to free some... */
    if (tb->nuse == MAX_INT)  /* still too many? */
      luaM_error(L);  /* cannot even create a message... */
  }
  if (tb->size <= MAXSTRTB / 2)  /* can grow string table? */
    luaS_resize(L, tb->size * 2);
}


/*
** Checks whether short string exists and reuses it or creates a new one.
*/
static TString *internshrstr (lua_State *L, const char *str, size_t l) {
  TString *ts;
  global_State *g = G(L);
  stringtable *tb = &g->strt;
  unsigned int h = luaS_hash(str, l, g->seed);
  TString **list = strbucket(tb, h);  /* LUA_SANDBOX */
  lua_assert(str != NULL);  /* otherwise 'memcmp'/'memcpy' are undefined */
  for (ts = *list; ts != NULL; ts = ts->u.hnext) {
    if (l == ts->shrlen && (memcmp(str, getshrstr(ts), l * sizeof(char)) == 0)) {
      /* found! */
      if (isdead(g, ts))  /* dead (but not collected yet)? */
        changewhite(ts);  /* resurrect it */
      return ts;
    }
  }
  /* else must create a new string */
  if (tb->nuse >= tb->size && tb->small == tb->size)  /* need to grow? */
    growstrtab(L, tb);
  /* LUA_SANDBOX: a resize in progress takes a step (see 'strbucket'), paid
     in the collector's unit, 3 per 8 buckets: a debit, never a raise
     ('lua_pushlstring' may only fail for lack of memory) */
  if (tb->small < tb->size)
    luaG_sandboxdebit(L, (3 * luaS_resizestep(L, STRTSTEP) + 7) >> 3);
  ts = createstrobj(L, l, LUA_VSHRSTR, h);
  ts->shrlen = cast_byte(l);
  memcpy(getshrstr(ts), str, l * sizeof(char));
  /* LUA_SANDBOX: its bucket now (an emergency collection in 'createstrobj'
     may have removed strings; it takes no resize step) */
  list = strbucket(tb, h);
  ts->u.hnext = *list;
  *list = ts;
  tb->nuse++;
  return ts;
}


/*
** LUA_SANDBOX: a new long string, its copy paid for ('luaS_createlngstrobj')
** and done in pieces with a check between two ('luaG_sandboxcopy'); returns
** the bytes copied, fewer than 'l' when the run was aborted meanwhile (the
** caller completes the copy or raises). Nothing else can see 'ts' meanwhile:
** the ticker never allocates, so no collection runs before the return.
*/
static TString *newlngstr (lua_State *L, const char *str, size_t l,
                           size_t *done) {
  TString *ts;
  if (l_unlikely(l * sizeof(char) >= (MAX_SIZE - sizeof(TString))))
    luaM_toobig(L);
  ts = luaS_createlngstrobj(L, l);
  *done = luaG_sandboxcopy(L, getlngstr(ts), str, l * sizeof(char));
  return ts;
}


/*
** new string (with explicit length)
** LUA_SANDBOX: 'lua_pushlstring' may not raise, so when the run is aborted
** during the copy of a long string the copy is completed: the string is
** whole, and the next instruction or charge raises (aborts are sticky).
*/
TString *luaS_newlstr (lua_State *L, const char *str, size_t l) {
  if (l <= LUAI_MAXSHORTLEN)  /* short string? */
    return internshrstr(L, str, l);
  else {
    size_t done;
    TString *ts = newlngstr(L, str, l, &done);
    if (l_unlikely(done < l))
      memcpy(getlngstr(ts) + done, str + done, (l - done) * sizeof(char));
    return ts;
  }
}


/*
** LUA_SANDBOX: 'luaS_newlstr' that raises when the run is aborted during
** the copy of a long string (only where 'luaG_runerror' would be legal);
** the unfinished string is garbage nobody reads.
*/
TString *luaS_newlstrorraise (lua_State *L, const char *str, size_t l) {
  if (l <= LUAI_MAXSHORTLEN)  /* short string? */
    return internshrstr(L, str, l);
  else {
    size_t done;
    TString *ts = newlngstr(L, str, l, &done);
    if (l_unlikely(done < l))
      luaG_sandboxcharge(L, 0);  /* aborts are sticky: this raises */
    return ts;
  }
}


/*
** Create or reuse a zero-terminated string, first checking in the
** cache (using the string address as a key). The cache can contain
** only zero-terminated strings, so it is safe to use 'strcmp' to
** check hits.
*/
TString *luaS_new (lua_State *L, const char *str) {
  unsigned int i = point2uint(str) % STRCACHE_N;  /* hash */
  int j;
  TString **p = G(L)->strcache[i];
  for (j = 0; j < STRCACHE_M; j++) {
    if (strcmp(str, getstr(p[j])) == 0)  /* hit? */
      return p[j];  /* that is it */
  }
  /* normal route */
  for (j = STRCACHE_M - 1; j > 0; j--)
    p[j] = p[j - 1];  /* move out last element */
  /* new element is first in the list */
  p[0] = luaS_newlstr(L, str, strlen(str));
  return p[0];
}


Udata *luaS_newudata (lua_State *L, size_t s, int nuvalue) {
  Udata *u;
  int i;
  GCObject *o;
  if (l_unlikely(s > MAX_SIZE - udatamemoffset(nuvalue)))
    luaM_toobig(L);
  o = luaC_newobj(L, LUA_VUSERDATA, sizeudata(nuvalue, s));
  u = gco2u(o);
  u->len = s;
  u->nuvalue = nuvalue;
  u->metatable = NULL;
  for (i = 0; i < nuvalue; i++)
    setnilvalue(&u->uv[i].uv);
  return u;
}

