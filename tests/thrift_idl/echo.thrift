// A small service for the Thrift proxy tests: every wire type appears in Item.

exception Unavailable {
    1: string why
}

struct Item {
    1: i32 id,
    2: string name,
    3: list<double> weights,
    4: map<string, i64> counts,
    5: set<i16> tags,
    6: bool flag,
    7: binary blob,
    8: optional Item child,
    9: list<Item> children,
    10: byte small,
    11: list<bool> bits,
    12: map<i32, list<string>> nested,
}

service Echo {
    string ping(),
    string whoami(),
    string echo(1: string text),
    Item roundtrip(1: Item item),
    i64 add(1: i64 a, 2: i64 b),
    string fail(1: string why) throws (1: Unavailable unavailable),
    oneway void note(1: string text),
    string slow(1: double seconds),
}
