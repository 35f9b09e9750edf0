import KNet
import Testing

/// Behaviours a user of Go's knet relies on, through the Swift layer.
extension KNetTests {
    @Suite("Go knet parity")
    struct GoParity {
        /// Go's Send drops an empty message (nothing reaches the wire); knet's StdCodec sends
        /// an empty frame, which the peer gets as an empty message. Raw: nothing, as in Go.
        @Test("an empty send: StdCodec puts an empty frame on the wire, the raw codec nothing")
        func emptySend() throws {
            for (codec, wire) in [(StdCodec() as (any Codec)?, [0, 0, 0, 1, 0x78] as [UInt8]),
                                  (nil, [0x78])] {
                let sent = Locked<Bool>(false)
                let handler = RecordingHandler(onConnect: { conn in
                    try? conn.send([])
                    try? conn.send([0x78])
                    sent.withLock { $0 = true }
                })
                let harness = try ServerHarness(handler: handler, codec: codec)
                let peer = try PlainSocket(port: harness.port)
                #expect(eventually { sent.withLock { $0 } })
                #expect(try peer.read(exactly: wire.count) == wire)
                #expect(harness.stop() == .serverClosed)
            }
        }

        /// Go: a pending-send limit counts messages (`len(c.bufs) >= pendingSend`) and a limit
        /// <= 0 is unlimited. knet: n messages queued make the next send throw
        /// `.pendingSendFull` (Go's ErrConnectionPendingSendFull); a negative limit is unlimited.
        @Test("setPendingSend counts messages; a negative limit is unlimited")
        func pendingSend() throws {
            let result = Locked<[String]>([])
            let handler = RecordingHandler(onConnect: { conn in
                func attempt(_ bytes: [UInt8]) -> String {
                    do { try conn.send(bytes); return "ok" } catch { return "\(error)" }
                }
                conn.setPendingSend(3)
                var outcomes = [attempt([UInt8](repeating: 1, count: 16 << 20))] // more than the socket takes
                outcomes += [attempt([2]), attempt([3]), attempt([4])]
                conn.setPendingSend(-1)
                outcomes.append(attempt([5]))
                result.withLock { $0 = outcomes }
            })
            let harness = try ServerHarness(handler: handler, codec: nil)
            let peer = try PlainSocket(port: harness.port) // does not read meanwhile
            withExtendedLifetime(peer) {
                #expect(eventually { !result.withLock { $0 }.isEmpty })
            }
            #expect(result.withLock { $0 } == ["ok", "ok", "ok", "\(KNetError.pendingSendFull)", "ok"])
            #expect(harness.stop() == .serverClosed)
        }
    }
}
