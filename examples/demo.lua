-- An agent-style script: reads its context from globals, prints as it goes, and returns a
-- table. Run with: make demo
local words = {}
for w in ("the quick brown fox jumps over the lazy dog"):gmatch("%a+") do
  words[#words + 1] = w
end

print("hello, " .. name .. "! counting " .. #words .. " words")

local counts = {}
for _, w in ipairs(words) do
  counts[w] = (counts[w] or 0) + 1
end

-- Some real work, so a tight --max-instructions budget trips the limit.
local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
local f = fib(20)
print("fib(20) = " .. f)

return {greeting = "hi " .. name, words = #words, counts = counts, fib = f}
