#if canImport(Glibc)
import Glibc
#endif
import KNet
import Testing

extension KNetTests {
    /// The pending-send limit counts messages the socket did not take: an echo under
    /// `setPendingSend(8)` answers every frame of a 200-frame burst, although the later
    /// answers of one read pass are batched to its end.
    @Test("an echo under setPendingSend answers every frame of a burst")
    func pendingLimitInReadPass() throws {
        let refused = Locked<[KNetError]>([])
        let handler = RecordingHandler(onConnect: { $0.setPendingSend(8) }, onReceive: { conn, buf in
            do { try conn.send(buf) } catch let error as KNetError {
                refused.withLock { $0.append(error) }
            } catch {}
        })
        let server = try ServerHarness(handler: handler, codec: StdCodec())
        let peer = try PlainSocket(port: server.port)
        var burst: [UInt8] = []
        for index in 0..<200 { burst += [0, 2, UInt8(index & 0xff), UInt8(index >> 8)] }
        try peer.write(burst)
        #expect(eventually { handler.totalMessages == 200 })
        #expect(refused.withLock { $0.count } == 0, "answers refused: \(Set(refused.withLock { $0 }))")
        if refused.withLock({ $0.isEmpty }) { #expect(try peer.read(exactly: burst.count) == burst) }
        #expect(server.stop() == .serverClosed)
    }

    /// Through a Swift codec the queued-bytes bound and the close map to their Swift errors:
    /// one message larger than the bound goes into the empty queue, the next throws
    /// `.pendingSendFull` (from this thread and on the loop alike), `.connectionClosed`
    /// once closed; an unlimited bound takes it.
    @Test("a Swift codec's sends map the bound and the close to their errors")
    func swiftCodecSendErrors() throws {
        let onLoop = Locked<[String]>([])
        let big = [UInt8](repeating: 9, count: 8 << 20) // more than the socket takes
        let handler = RecordingHandler(onConnect: { conn in
            conn.setMaxQueuedBytes(1 << 20)
            var outcomes: [String] = []
            for bytes in [big, [1]] {
                do { try conn.send(bytes); outcomes.append("ok") } catch { outcomes.append("\(error)") }
            }
            onLoop.withLock { $0 = outcomes }
        })
        let server = try ServerHarness(handler: handler, codec: HeaderBodyCodec())
        let peer = try PlainSocket(port: server.port) // does not read
        #expect(eventually { !onLoop.withLock { $0 }.isEmpty })
        #expect(onLoop.withLock { $0 } == ["ok", "\(KNetError.pendingSendFull)"])
        let conn = try #require(handler.only?.object)
        #expect(throws: KNetError.pendingSendFull) { try conn.send([2]) }
        #expect(throws: KNetError.pendingSendFull) { try conn.send([UInt8](repeating: 3, count: 10)[...]) }
        conn.setMaxQueuedBytes(0)
        try conn.send([4])
        conn.close()
        #expect(throws: KNetError.connectionClosed) { try conn.send([5]) }
        #expect(throws: KNetError.connectionClosed) { try conn.send([UInt8]()) }
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(handler.only?.reasonAtDisconnect == .local)
        _ = peer
        #expect(server.stop() == .serverClosed)
    }
}
