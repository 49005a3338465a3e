//! The Lua scripts that make each Redis step atomic (publish, a replay
//! page, mailbox push, take and put-back), and how they are loaded.

use std::sync::Mutex;

use super::lock;
use super::resp::{Conn, RespError, Value};

/// Picks the next id (the Redis clock's millisecond, or the same
/// millisecond's next sequence), appends the frame to the stream of each
/// of its topics (`KEYS[5]` on; an update of several topics is one event,
/// under one id, in each) with that topic's entry number `n` (1, 2, 3,
/// ...: a reader that sees one skipped knows Redis trimmed events it had
/// not read), and, while some node has subscribers by selector (the key
/// `KEYS[4]` exists), once to the stream of every update (`KEYS[3]`,
/// trimmed to about `ARGV[6]` entries) with its topics (`ARGV[5]`, field
/// `t`) and an entry number of its own; then records the id as the newest
/// (`KEYS[1]`). Atomic, so ids increase across all topics and nodes. A
/// private update (`ARGV[4]` = `1`) carries the field `p` = `1`; an update
/// of several topics the field `m` = `1` in the topics' streams (a reader
/// hands it to a subscriber of several once); one with a publisher-given
/// id (`ARGV[7]`, empty for none) the field `i`, the id its frame shows.
/// The stream of every update has no gap after the id in `KEYS[5]`: set
/// (to the newest id before) by the first publish that writes it, deleted
/// by one that does not. A publisher-given id is also kept in the hash
/// `KEYS[6]`, to the first id that carried it, the newest `ARGV[8]` or so
/// of them (their order in the sorted set `KEYS[7]`). Topics' streams are
/// `KEYS[8]` on.
pub(super) const PUBLISH: &str = r"
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = redis.call('GET', KEYS[1])
local id
if last then
  local dash = string.find(last, '-', 1, true)
  local lms = tonumber(string.sub(last, 1, dash - 1))
  local lseq = tonumber(string.sub(last, dash + 1))
  if ms > lms then id = string.format('%d-0', ms) else id = string.format('%d-%d', lms, lseq + 1) end
else
  id = string.format('%d-0', ms)
end
for i = 8, #KEYS do
  local n = redis.call('HINCRBY', KEYS[2], KEYS[i], 1)
  local fields = {'f', ARGV[2], 'o', ARGV[3], 'n', n}
  if ARGV[4] == '1' then
    table.insert(fields, 'p')
    table.insert(fields, '1')
  end
  if #KEYS > 8 then
    table.insert(fields, 'm')
    table.insert(fields, '1')
  end
  if ARGV[7] ~= '' then
    table.insert(fields, 'i')
    table.insert(fields, ARGV[7])
  end
  redis.call('XADD', KEYS[i], 'MAXLEN', ARGV[1], id, unpack(fields))
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  if redis.call('EXISTS', KEYS[5]) == 0 then redis.call('SET', KEYS[5], last or '0-0') end
  local n = redis.call('HINCRBY', KEYS[2], KEYS[3], 1)
  local fields = {'f', ARGV[2], 'o', ARGV[3], 'n', n, 't', ARGV[5]}
  if ARGV[4] == '1' then
    table.insert(fields, 'p')
    table.insert(fields, '1')
  end
  if ARGV[7] ~= '' then
    table.insert(fields, 'i')
    table.insert(fields, ARGV[7])
  end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], id, unpack(fields))
else
  redis.call('DEL', KEYS[5])
end
if ARGV[7] ~= '' and redis.call('HSETNX', KEYS[6], ARGV[7], id) == 1 then
  redis.call('ZADD', KEYS[7], ms, ARGV[7])
  local n = redis.call('ZCARD', KEYS[7])
  local keep = tonumber(ARGV[8])
  if n > keep + 64 then
    local old = redis.call('ZRANGE', KEYS[7], 0, n - keep - 1)
    redis.call('ZREMRANGEBYRANK', KEYS[7], 0, n - keep - 1)
    redis.call('HDEL', KEYS[6], unpack(old))
  end
end
redis.call('SET', KEYS[1], id)
return id
";

/// One page of a topic's replay: `{first id or false, trimmed (1 or 0),
/// entries, newest id ever added or false, cut (1 when the byte bound left
/// entries out), the value of `KEYS[3]` if given or false}`, where `trimmed` says whether the stream lost entries (it
/// holds fewer than were published to it) and the entries are those in
/// `(ARGV[1]`, `ARGV[2]]`, at most `ARGV[3]` and, past the first, at most
/// `ARGV[4]` bytes of fields. One round trip, and only the page's frames
/// cross the wire (`XINFO STREAM` would bring the first and last entries'
/// frames too).
/// KEYS: the topic's stream, the count hash (and, for the stream of every
/// update, the key saying since when it has no gap).
pub(super) const PAGE: &str = r"
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local f = false
if first[1] then f = first[1][1] end
local added = tonumber(redis.call('HGET', KEYS[2], KEYS[1]) or '0')
local trimmed = 0
if added > redis.call('XLEN', KEYS[1]) then trimmed = 1 end
local want = tonumber(ARGV[3])
local budget = tonumber(ARGV[4])
local page = {}
local bytes = 0
local cut = 0
local start = ARGV[1]
-- Read in small steps, so a page of large entries makes Redis read
-- little past it.
while cut == 0 and #page < want do
  local step = redis.call('XRANGE', KEYS[1], start, ARGV[2], 'COUNT', math.min(16, want - #page))
  for _, e in ipairs(step) do
    local size = 0
    for j = 2, #e[2], 2 do size = size + #e[2][j] end
    if #page > 0 and bytes + size > budget then
      cut = 1
      break
    end
    bytes = bytes + size
    page[#page + 1] = e
    start = '(' .. e[1]
  end
  if #step < 16 then break end
end
local last = false
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
local since = false
if KEYS[3] then since = redis.call('GET', KEYS[3]) end
return {f, trimmed, page, last, cut, since}
";

/// Drops expired messages at the head, refuses a full mailbox (-1), else
/// appends `ms:text`, renews the list's TTL and announces the push.
pub(super) const PUSH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
while true do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then break end
  local c = string.find(head, ':', 1, true)
  if c and tonumber(string.sub(head, 1, c - 1)) + ttl >= now then break end
  redis.call('LPOP', KEYS[1])
end
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
local n = redis.call('RPUSH', KEYS[1], string.format('%d:', now) .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'k', ARGV[4])
return n
";

/// Pops the oldest message that has not expired (`ms:text`), or nil.
pub(super) const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
while true do
  local v = redis.call('LPOP', KEYS[1])
  if not v then return false end
  local c = string.find(v, ':', 1, true)
  if c and tonumber(string.sub(v, 1, c - 1)) + tonumber(ARGV[1]) >= now then return v end
end
";

/// Puts a taken message back at the front; a list the take emptied (and
/// so deleted) gets its TTL again; the message is announced like a push.
pub(super) const UNTAKE: &str = r"
redis.call('LPUSH', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'k', ARGV[3])
return 1
";

/// A script, loaded into Redis on first use (and again after a Redis
/// restart emptied its script cache).
pub(super) struct Script {
    text: &'static str,
    sha: Mutex<Option<String>>,
}

impl Script {
    pub(super) const fn new(text: &'static str) -> Self {
        Script {
            text,
            sha: Mutex::new(None),
        }
    }

    pub(super) fn run(
        &self,
        conn: &mut Conn,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Result<Value, RespError> {
        let cached = lock(&self.sha).clone();
        let sha = match cached {
            Some(sha) => sha,
            None => self.load(conn)?,
        };
        match self.evalsha(conn, &sha, keys, args) {
            Err(RespError::Server(m)) if m.starts_with("NOSCRIPT") => {
                let sha = self.load(conn)?;
                self.evalsha(conn, &sha, keys, args)
            }
            r => r,
        }
    }

    fn load(&self, conn: &mut Conn) -> Result<String, RespError> {
        let sha = conn
            .command(&[b"SCRIPT", b"LOAD", self.text.as_bytes()])?
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| RespError::Protocol("SCRIPT LOAD gave no digest".into()))?;
        *lock(&self.sha) = Some(sha.clone());
        Ok(sha)
    }

    fn evalsha(
        &self,
        conn: &mut Conn,
        sha: &str,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Result<Value, RespError> {
        let nkeys = keys.len().to_string();
        let mut cmd: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), nkeys.as_bytes()];
        cmd.extend_from_slice(keys);
        cmd.extend_from_slice(args);
        conn.command(&cmd)
    }
}
