import { describeOrdersService } from '../../shared/test/orders-service-suite.ts'

describeOrdersService('hono-app', {
  metrics: true,
  banner: /orders service \(hono\) listening on (http:\/\/\S+)/,
})
