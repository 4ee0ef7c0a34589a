/*
** sb_json.c -- the sandbox's `json` library: json.encode, json.decode,
** json.array, json.null.
**
** Written against the Lua C API only, so it raises exactly like Lua's own
** libraries (lua_error/luaL_error, longjmp): all state lives on the C stack
** or the Lua stack, nothing needs freeing.  Work is charged to the run's
** budget (sb_budget.h), nesting is bounded by the depth in the registry
** (the run's max_depth), and every byte produced lives in the Lua heap, so
** max_memory bounds it.
**
** Mapping (README "JSON"):
**   nil, json.null      <-> null
**   boolean             <-> true / false
**   integer             <-> number without fraction or exponent (fits int64)
**   float               <-> other numbers (NaN and infinities cannot be encoded)
**   string (UTF-8)      <-> string (invalid UTF-8 is an error both ways)
**   table 1..n          <-> array; a table marked with json.array(t) is an
**                            array even when empty; decoded arrays are marked
**   other table         <-> object; keys must be strings or numbers (numbers
**                            become their decimal text); {} encodes as {}
*/

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lua.h"
#include "lauxlib.h"

#include "sb_budget.h"


/* registry keys (addresses) */
static const char SB_JSON_ARRAY_MT = 0;
static const char SB_JSON_DEPTH = 0;
static const char SB_JSON_NULL = 0;

#define SB_JSON_DEFAULT_DEPTH	64

/* json.null: a light userdata, equal only to itself */
#define sb_json_null	((void *)&SB_JSON_NULL)

#if defined(__GNUC__)
#define SB_NORETURN	__attribute__((noreturn))
#else
#define SB_NORETURN
#endif


static int json_depth_limit (lua_State *L) {
  lua_Integer d;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &SB_JSON_DEPTH);
  d = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : SB_JSON_DEFAULT_DEPTH;
  lua_pop(L, 1);
  return (d < 1) ? 1 : (d > 10000 ? 10000 : (int)d);
}


/* ---------------------------------------------------------------- encode */

/*
** The output buffer: a full userdata at stack index 'idx', replaced by a
** bigger one as it grows (luaL_Buffer cannot be used: it needs its box at
** the top of the stack, and encoding pushes the values it visits).
*/
typedef struct Enc {
  lua_State *L;
  char *p;
  size_t n, cap;
  int idx;
  int maxdepth;
  unsigned long long steps;
} Enc;


static void enc_add (Enc *e, const char *s, size_t len) {
  if (e->cap - e->n < len) {
    size_t cap = e->cap * 2;
    char *np;
    if (cap - e->n < len) cap = e->n + len;
    if (cap < e->n) luaL_error(e->L, "json.encode: result too large");
    np = (char *)lua_newuserdatauv(e->L, cap, 0);
    /* in pieces with a check between two (paid by the caller's charges) */
    luaL_sandboxcopy(e->L, np, e->p, e->n);
    lua_replace(e->L, e->idx);  /* the old box is garbage now */
    e->p = np;
    e->cap = cap;
  }
  luaL_sandboxmemcpy(e->L, e->p + e->n, s, len);
  e->n += len;
}

#define enc_char(e,c)	do { char c_ = (c); enc_add((e), &c_, 1); } while (0)
#define enc_lit(e,s)	enc_add((e), (s), sizeof(s) - 1)


/* length of the valid UTF-8 sequence at s[0..len), or 0 if invalid */
static size_t utf8_seq (const unsigned char *s, size_t len) {
  unsigned int c = s[0];
  size_t n, i;
  unsigned int cp;
  if (c < 0x80) return 1;
  else if (c >= 0xC2 && c <= 0xDF) { n = 2; cp = c & 0x1F; }
  else if (c >= 0xE0 && c <= 0xEF) { n = 3; cp = c & 0x0F; }
  else if (c >= 0xF0 && c <= 0xF4) { n = 4; cp = c & 0x07; }
  else return 0;
  if (len < n) return 0;
  for (i = 1; i < n; i++) {
    if ((s[i] & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (s[i] & 0x3F);
  }
  if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF))
      || (cp >= 0xD800 && cp <= 0xDFFF))
    return 0;  /* overlong, out of range or a surrogate */
  return n;
}


static void enc_string (Enc *e, const char *s, size_t len) {
  static const char hex[] = "0123456789abcdef";
  const unsigned char *p = (const unsigned char *)s;
  size_t i = 0;
  size_t start = e->n;  /* where this string's output starts */
  size_t charged = 0;  /* bytes of output charged so far */
  enc_char(e, '"');
  while (i < len) {
    unsigned char c = p[i];
    /* long strings: charge (and so check: a piece is more than SB_BATCH
       units) every 16 KiB of output as we go (not 64 KiB of input: a
       control character is 6 bytes out, and a string of NULs ran 2-4 ms
       between two checks) */
    if ((e->n - start) - charged >= 0x4000) {
      sb_count(e->L, e->steps, sb_bytes(0x4000));
      charged += 0x4000;
    }
    if (c >= 0x80) {
      size_t n = utf8_seq(p + i, len - i);
      if (n == 0)
        luaL_error(e->L, "json.encode: string is not valid UTF-8 (byte %d)",
                   (int)(i + 1));
      enc_add(e, s + i, n);
      i += n;
      continue;
    }
    if (c == '"' || c == '\\') {
      char q[2] = {'\\', (char)c};
      enc_add(e, q, 2);
    }
    else if (c == '\n') enc_lit(e, "\\n");
    else if (c == '\r') enc_lit(e, "\\r");
    else if (c == '\t') enc_lit(e, "\\t");
    else if (c < 0x20 || c == 0x7F) {
      char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
      enc_add(e, u, 6);
    }
    else enc_char(e, (char)c);
    i++;
  }
  enc_char(e, '"');
  sb_count(e->L, e->steps, sb_bytes((e->n - start) - charged));
}


static void enc_number (Enc *e, int idx) {
  char buf[64];
  int n;
  if (lua_isinteger(e->L, idx))
    n = snprintf(buf, sizeof(buf), LUA_INTEGER_FMT,
                 (LUAI_UACINT)lua_tointeger(e->L, idx));
  else {
    double d = (double)lua_tonumber(e->L, idx);
    int prec;
    if (isnan(d) || isinf(d))
      luaL_error(e->L, "json.encode: %s cannot be encoded",
                 isnan(d) ? "NaN" : "an infinity");
    /* the shortest precision that reads back as the same number */
    for (prec = 15; prec < 17; prec++) {
      n = snprintf(buf, sizeof(buf), "%.*g", prec, d);
      if (strtod(buf, NULL) == d) break;
    }
    if (prec == 17)
      n = snprintf(buf, sizeof(buf), "%.17g", d);
    if (strpbrk(buf, ".eEn") == NULL && n + 2 < (int)sizeof(buf)) {
      buf[n++] = '.';  /* keep it a float: 1.0 stays 1.0 */
      buf[n++] = '0';
      buf[n] = '\0';
    }
  }
  enc_add(e, buf, (size_t)n);
}


static void enc_value (Enc *e, int idx, int depth);


/*
** 1..n with n == #t and exactly n keys: an array. Each key is counted as
** one step: 'lua_next' only debits its scan (a debit never ticks), so a
** table of 100 000 keys ran ~3 ms between two checks here.
*/
static int is_array (Enc *e, int idx, lua_Integer *n) {
  lua_State *L = e->L;
  lua_Integer count = 0, len;
  if (lua_getmetatable(L, idx)) {
    int marked;
    lua_rawgetp(L, LUA_REGISTRYINDEX, &SB_JSON_ARRAY_MT);
    marked = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    if (marked) {
      *n = (lua_Integer)lua_rawlen(L, idx);
      return 1;
    }
  }
  len = (lua_Integer)lua_rawlen(L, idx);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    sb_count(L, e->steps, 1);
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1
        || lua_tointeger(L, -1) > len) {
      lua_pop(L, 1);
      return 0;
    }
    count++;
  }
  *n = len;
  return count == len && len > 0;
}


static void enc_table (Enc *e, int idx, int depth) {
  lua_State *L = e->L;
  lua_Integer n, i;
  int first = 1;
  if (depth >= e->maxdepth)
    luaL_error(L, "json.encode: tables nested deeper than %d (or a cycle)",
               e->maxdepth);
  luaL_checkstack(L, 6, "json.encode: nesting");
  if (is_array(e, idx, &n)) {
    enc_char(e, '[');
    for (i = 1; i <= n; i++) {
      if (i > 1) enc_char(e, ',');
      lua_rawgeti(L, idx, i);
      enc_value(e, lua_gettop(L), depth + 1);
      lua_pop(L, 1);
    }
    enc_char(e, ']');
    return;
  }
  enc_char(e, '{');
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int k = lua_gettop(L) - 1;
    if (!first) enc_char(e, ',');
    first = 0;
    if (lua_type(L, k) == LUA_TSTRING) {
      size_t len;
      const char *s = lua_tolstring(L, k, &len);
      enc_string(e, s, len);
    }
    else if (lua_type(L, k) == LUA_TNUMBER) {
      enc_char(e, '"');
      enc_number(e, k);
      enc_char(e, '"');
    }
    else
      luaL_error(L, "json.encode: object keys must be strings or numbers, got %s",
                 luaL_typename(L, k));
    enc_char(e, ':');
    enc_value(e, k + 1, depth + 1);
    lua_pop(L, 1);
  }
  enc_char(e, '}');
}


static void enc_value (Enc *e, int idx, int depth) {
  lua_State *L = e->L;
  sb_count(L, e->steps, 1);
  switch (lua_type(L, idx)) {
    case LUA_TNIL: enc_lit(e, "null"); break;
    case LUA_TBOOLEAN:
      if (lua_toboolean(L, idx)) enc_lit(e, "true");
      else enc_lit(e, "false");
      break;
    case LUA_TNUMBER: enc_number(e, idx); break;
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, idx, &len);
      enc_string(e, s, len);
      break;
    }
    case LUA_TTABLE: enc_table(e, idx, depth); break;
    case LUA_TLIGHTUSERDATA:
      if (lua_touserdata(L, idx) == sb_json_null) {
        enc_lit(e, "null");
        break;
      }
      /* FALLTHROUGH */
    default:
      luaL_error(L, "json.encode: cannot encode a %s", luaL_typename(L, idx));
  }
}


static int json_encode (lua_State *L) {
  Enc e;
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  e.L = L;
  e.maxdepth = json_depth_limit(L);
  e.steps = 0;
  e.n = 0;
  e.cap = 64;
  e.p = (char *)lua_newuserdatauv(L, e.cap, 0);
  e.idx = 2;
  enc_value(&e, 1, 0);
  sb_count(L, e.steps, sb_bytes(e.n));
  sb_flush(L, &e.steps);
  lua_sandboxpushlstring(L, e.p, e.n);  /* the copy paid above, in pieces */
  return 1;
}


/* ---------------------------------------------------------------- decode */

typedef struct Dec {
  lua_State *L;
  const unsigned char *s;
  size_t len, pos;
  int maxdepth;
  unsigned long long steps;
} Dec;


SB_NORETURN static void dec_error (Dec *d, const char *what) {
  size_t i, line = 1, col = 1;
  sb_count(d->L, d->steps, sb_bytes(d->pos));  /* the position scan below */
  for (i = 0; i < d->pos && i < d->len; i++) {
    if (d->s[i] == '\n') { line++; col = 1; }
    else col++;
  }
  if (d->pos >= d->len)
    luaL_error(d->L, "json.decode: %s at the end of the input", what);
  luaL_error(d->L, "json.decode: %s at line %d column %d", what, (int)line,
             (int)col);
  for (;;) {}  /* not reached: luaL_error does not return */
}



static void skip_ws (Dec *d) {
  size_t start = d->pos;
  while (d->pos < d->len) {
    unsigned char c = d->s[d->pos];
    if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
    d->pos++;
    if (((d->pos - start) & 0xFFFF) == 0)
      sb_count(d->L, d->steps, sb_bytes(0x10000));
  }
  sb_count(d->L, d->steps, sb_bytes((d->pos - start) & 0xFFFF));
}


static int hexval (int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}


static unsigned int dec_hex4 (Dec *d) {
  unsigned int v = 0;
  int i;
  if (d->len - d->pos < 4) dec_error(d, "truncated \\u escape");
  for (i = 0; i < 4; i++) {
    int h = hexval(d->s[d->pos + i]);
    if (h < 0) dec_error(d, "bad \\u escape");
    v = (v << 4) | (unsigned int)h;
  }
  d->pos += 4;
  return v;
}


static void add_utf8 (luaL_Buffer *b, unsigned int cp) {
  char u[4];
  int n;
  if (cp < 0x80) { u[0] = (char)cp; n = 1; }
  else if (cp < 0x800) {
    u[0] = (char)(0xC0 | (cp >> 6)); u[1] = (char)(0x80 | (cp & 0x3F)); n = 2;
  }
  else if (cp < 0x10000) {
    u[0] = (char)(0xE0 | (cp >> 12)); u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    u[2] = (char)(0x80 | (cp & 0x3F)); n = 3;
  }
  else {
    u[0] = (char)(0xF0 | (cp >> 18)); u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    u[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); u[3] = (char)(0x80 | (cp & 0x3F));
    n = 4;
  }
  luaL_addlstring(b, u, (size_t)n);
}


/* pushes the string starting after the opening quote */
static void dec_string (Dec *d) {
  lua_State *L = d->L;
  luaL_Buffer b;
  size_t start = d->pos;
  luaL_buffinit(L, &b);
  for (;;) {
    unsigned char c;
    if (d->pos >= d->len) dec_error(d, "unterminated string");
    if (((d->pos - start) & 0xFFFF) == 0xFFFF)
      sb_count(L, d->steps, sb_bytes(0x10000));
    c = d->s[d->pos];
    if (c == '"') { d->pos++; break; }
    if (c < 0x20) dec_error(d, "control character in string");
    if (c == '\\') {
      unsigned char x;
      d->pos++;
      if (d->pos >= d->len) dec_error(d, "unterminated string");
      x = d->s[d->pos++];
      switch (x) {
        case '"': luaL_addchar(&b, '"'); break;
        case '\\': luaL_addchar(&b, '\\'); break;
        case '/': luaL_addchar(&b, '/'); break;
        case 'b': luaL_addchar(&b, '\b'); break;
        case 'f': luaL_addchar(&b, '\f'); break;
        case 'n': luaL_addchar(&b, '\n'); break;
        case 'r': luaL_addchar(&b, '\r'); break;
        case 't': luaL_addchar(&b, '\t'); break;
        case 'u': {
          unsigned int cp = dec_hex4(d);
          if (cp >= 0xD800 && cp <= 0xDBFF) {  /* a surrogate pair */
            unsigned int lo;
            if (d->len - d->pos < 2 || d->s[d->pos] != '\\' || d->s[d->pos + 1] != 'u')
              dec_error(d, "lone surrogate in \\u escape");
            d->pos += 2;
            lo = dec_hex4(d);
            if (lo < 0xDC00 || lo > 0xDFFF) dec_error(d, "bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          else if (cp >= 0xDC00 && cp <= 0xDFFF)
            dec_error(d, "lone surrogate in \\u escape");
          add_utf8(&b, cp);
          break;
        }
        default: d->pos--; dec_error(d, "bad escape");
      }
      continue;
    }
    if (c >= 0x80) {
      size_t n = utf8_seq(d->s + d->pos, d->len - d->pos);
      if (n == 0) dec_error(d, "invalid UTF-8");
      luaL_addlstring(&b, (const char *)d->s + d->pos, n);
      d->pos += n;
      continue;
    }
    luaL_addchar(&b, (char)c);
    d->pos++;
  }
  luaL_pushresult(&b);
  sb_count(L, d->steps, sb_bytes((d->pos - start) & 0xFFFF));
}


#define SB_DIGITS(d,start) \
  while ((d)->pos < (d)->len && (d)->s[(d)->pos] >= '0' && (d)->s[(d)->pos] <= '9') { \
    if (++(d)->pos - (start) >= 128) dec_error((d), "number too long"); }

static void dec_number (Dec *d) {
  size_t start = d->pos;
  int isfloat = 0;
  char buf[128];
  size_t n;
  if (d->pos < d->len && d->s[d->pos] == '-') d->pos++;
  if (d->pos >= d->len) dec_error(d, "bad number");
  if (d->s[d->pos] == '0') d->pos++;
  else if (d->s[d->pos] >= '1' && d->s[d->pos] <= '9') {
    SB_DIGITS(d, start)
  }
  else dec_error(d, "bad number");
  if (d->pos < d->len && d->s[d->pos] == '.') {
    isfloat = 1;
    d->pos++;
    if (d->pos >= d->len || d->s[d->pos] < '0' || d->s[d->pos] > '9')
      dec_error(d, "bad number");
    SB_DIGITS(d, start)
  }
  if (d->pos < d->len && (d->s[d->pos] == 'e' || d->s[d->pos] == 'E')) {
    isfloat = 1;
    d->pos++;
    if (d->pos < d->len && (d->s[d->pos] == '+' || d->s[d->pos] == '-')) d->pos++;
    if (d->pos >= d->len || d->s[d->pos] < '0' || d->s[d->pos] > '9')
      dec_error(d, "bad number");
    SB_DIGITS(d, start)
  }
  n = d->pos - start;
  if (n >= sizeof(buf)) dec_error(d, "number too long");
  memcpy(buf, d->s + start, n);
  buf[n] = '\0';
  if (!isfloat && lua_stringtonumber(d->L, buf) != 0) {
    /* an integer if it fits, as Lua reads it; else a float */
    if (lua_isinteger(d->L, -1)) return;
    lua_pop(d->L, 1);
  }
  lua_pushnumber(d->L, (lua_Number)strtod(buf, NULL));
}


static void dec_value (Dec *d, int depth);


static void dec_literal (Dec *d, const char *lit) {
  size_t n = strlen(lit);
  if (d->len - d->pos < n || memcmp(d->s + d->pos, lit, n) != 0)
    dec_error(d, "unexpected character");
  d->pos += n;
}


static void dec_value (Dec *d, int depth) {
  lua_State *L = d->L;
  skip_ws(d);
  if (d->pos >= d->len) dec_error(d, "unexpected end");
  sb_count(L, d->steps, 1);
  luaL_checkstack(L, 4, "json.decode: nesting");
  switch (d->s[d->pos]) {
    case '{': {
      int t;
      if (depth >= d->maxdepth) dec_error(d, "nested too deeply");
      d->pos++;
      lua_newtable(L);
      t = lua_gettop(L);
      skip_ws(d);
      if (d->pos < d->len && d->s[d->pos] == '}') { d->pos++; return; }
      for (;;) {
        skip_ws(d);
        if (d->pos >= d->len || d->s[d->pos] != '"') dec_error(d, "expected a string key");
        d->pos++;
        dec_string(d);
        skip_ws(d);
        if (d->pos >= d->len || d->s[d->pos] != ':') dec_error(d, "expected ':'");
        d->pos++;
        dec_value(d, depth + 1);
        lua_rawset(L, t);
        skip_ws(d);
        if (d->pos < d->len && d->s[d->pos] == ',') { d->pos++; continue; }
        if (d->pos < d->len && d->s[d->pos] == '}') { d->pos++; return; }
        dec_error(d, "expected ',' or '}'");
      }
    }
    case '[': {
      int t;
      lua_Integer i = 0;
      if (depth >= d->maxdepth) dec_error(d, "nested too deeply");
      d->pos++;
      lua_newtable(L);
      t = lua_gettop(L);
      lua_rawgetp(L, LUA_REGISTRYINDEX, &SB_JSON_ARRAY_MT);
      lua_setmetatable(L, t);
      skip_ws(d);
      if (d->pos < d->len && d->s[d->pos] == ']') { d->pos++; return; }
      for (;;) {
        dec_value(d, depth + 1);
        lua_rawseti(L, t, ++i);
        skip_ws(d);
        if (d->pos < d->len && d->s[d->pos] == ',') { d->pos++; continue; }
        if (d->pos < d->len && d->s[d->pos] == ']') { d->pos++; return; }
        dec_error(d, "expected ',' or ']'");
      }
    }
    case '"': d->pos++; dec_string(d); return;
    case 't': dec_literal(d, "true"); lua_pushboolean(L, 1); return;
    case 'f': dec_literal(d, "false"); lua_pushboolean(L, 0); return;
    case 'n': dec_literal(d, "null"); lua_pushlightuserdata(L, sb_json_null); return;
    default:
      if (d->s[d->pos] == '-' || (d->s[d->pos] >= '0' && d->s[d->pos] <= '9')) {
        dec_number(d);
        return;
      }
      dec_error(d, "unexpected character");
  }
}


static int json_decode (lua_State *L) {
  Dec d;
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_settop(L, 1);
  d.L = L;
  d.s = (const unsigned char *)s;
  d.len = len;
  d.pos = 0;
  d.maxdepth = json_depth_limit(L);
  d.steps = 0;
  dec_value(&d, 0);
  skip_ws(&d);
  if (d.pos != d.len) dec_error(&d, "trailing characters");
  sb_flush(L, &d.steps);
  return 1;
}


static int json_array (lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (lua_getmetatable(L, 1)) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &SB_JSON_ARRAY_MT);
    if (!lua_rawequal(L, -1, -2))
      return luaL_argerror(L, 1, "table already has a metatable");
    lua_settop(L, 1);
    return 1;
  }
  lua_settop(L, 1);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &SB_JSON_ARRAY_MT);
  lua_setmetatable(L, 1);
  return 1;
}


/*
** Opens the library as the global `json` (a lua_CFunction, run while the
** sandbox is built).
*/
int lua_sandbox_open_json (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"encode", json_encode},
    {"decode", json_decode},
    {"array", json_array},
    {NULL, NULL}
  };
  lua_createtable(L, 0, 2);  /* the array marker metatable */
  lua_pushliteral(L, "json.array");
  lua_setfield(L, -2, "__name");
  lua_rawsetp(L, LUA_REGISTRYINDEX, &SB_JSON_ARRAY_MT);
  lua_pushinteger(L, SB_JSON_DEFAULT_DEPTH);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &SB_JSON_DEPTH);
  luaL_newlib(L, funcs);
  lua_pushlightuserdata(L, sb_json_null);
  lua_setfield(L, -2, "null");
  lua_setglobal(L, "json");
  return 0;
}


/* json.null, for the host's marshaling (it becomes nil there) */
const void *lua_sandbox_json_null (void) {
  return sb_json_null;
}


/*
** Sets the depth bound for the run (max_depth).  Never raises: the key
** exists since the library was opened, so the registry does not grow.
*/
void lua_sandbox_json_set_depth (lua_State *L, lua_Integer depth) {
  lua_pushinteger(L, depth);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &SB_JSON_DEPTH);
}
